"""Tests for w2s_clip_lab/checks.py: flag types, model and file checks, the device; shared fixtures in conftest.py."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before open_clip / timm are imported


import open_clip
import pytest
import torch

import w2s_clip
from w2s_clip_lab import checks, miniature, run
from conftest import CU130, cli_args, main_error


@pytest.mark.parametrize("kind", ["garbage", "truncated", "wrong-shapes", "not-a-state-dict"])
def test_cli_error_clip_checkpoint_not_loadable(demo, tmp_path, kind):
    """A --clip-pretrained file that is not a checkpoint for the config stops before training;
    the matching checkpoint passes the same check."""
    config = str(demo / "tiny-clip.json")
    torch.manual_seed(0)
    good = tmp_path / "good.pt"
    torch.save(open_clip.CLIP(**miniature.TINY_CLIP).state_dict(), good)
    checks.check_clip_files(config, str(good))  # the truth that the check is not too strict
    ckpt = tmp_path / f"{kind}.pt"
    if kind == "garbage":
        ckpt.write_bytes(b"these bytes are not a checkpoint" * 8)
    elif kind == "truncated":
        ckpt.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    elif kind == "wrong-shapes":
        torch.save(open_clip.CLIP(**{**miniature.TINY_CLIP, "embed_dim": 32}).state_dict(), ckpt)
    else:
        torch.save([1, 2, 3], ckpt)
    main_error(cli_args(demo, demo / "data", tmp_path / "out", tmp_path / "cache",
                        **{"--clip-pretrained": ckpt}), f"--clip-pretrained {ckpt}")
    assert not (tmp_path / "cache").exists()


@pytest.mark.parametrize("requested, device, capability, expected", [
    ("auto", "cpu", None, "fp32"), ("fp32", "cpu", None, "fp32"), ("auto", "cuda", (8, 0), "bf16"),
    ("auto", "cuda", (9, 0), "bf16"), ("auto", "cuda", (7, 0), "fp16"), ("auto", "cuda", (7, 5), "fp16"),
    ("fp32", "cuda", (8, 0), "fp32"), ("bf16", "cuda", (7, 0), "bf16")])
def test_resolve_precision(requested, device, capability, expected):
    assert w2s_clip.resolve_precision(requested, device, capability) == expected


@pytest.mark.parametrize("requested", ["bf16", "fp16"])
def test_half_precision_on_the_cpu_is_a_user_error(requested):
    with pytest.raises(w2s_clip.UserError, match=f"--precision {requested} needs a CUDA device"):
        w2s_clip.resolve_precision(requested, "cpu")


@pytest.mark.parametrize("capability, arch_list, runs", [
    ((7, 0), CU130, False),  # a V100 on the CUDA 13 wheel: no kernel image
    ((6, 1), CU130, False), ((8, 0), CU130, True), ((8, 9), CU130, True),  # sm_86 kernels run on 8.9
    ((12, 1), CU130, True), ((7, 0), ["sm_50", "sm_60", "sm_70", "sm_75", "sm_80"], True),
    ((9, 0), ["sm_80", "compute_80"], True), ((9, 0), ["sm_80", "sm_86"], False), ((8, 0), [], False)])
def test_gpu_build_problem_against_the_arch_list(capability, arch_list, runs):
    problem = checks.gpu_build_problem(capability, arch_list, version="2.14.1+cu130")
    assert (problem is None) == runs, problem
    if not runs:
        assert f"sm_{10 * capability[0] + capability[1]}" in problem and "2.14.1+cu130" in problem


def test_device_line_names_device_gpu_capability_and_precision():
    gpu = {"device": "cuda:0", "name": "NVIDIA A100-SXM4-40GB", "capability": "sm_80",
           "precision": "bf16"}
    assert checks.device_line(gpu) == "device: cuda:0, NVIDIA A100-SXM4-40GB, sm_80, bf16"
    _, _, cpu = checks.choose_device("cpu", "auto")
    assert checks.device_line(cpu) == "device: cpu, fp32"
    assert cpu["torch"] == torch.__version__ and cpu["threads"] == torch.get_num_threads()


def test_cpu_cost_warning_only_for_a_large_domain():
    assert checks.cpu_cost_warning(320, 800, 2, 5) is None
    warning = checks.cpu_cost_warning(48212, 20916, 5, 3)  # sketch, Table 1
    assert warning.startswith("warning: no usable GPU") and " h for 69128 images and 5 seeds" in warning


@pytest.mark.parametrize("flags, fragment", [
    (["--dataset", "officehome", "--split-share", "0"], "--split-share 0 leaves no image"),
    (["--dataset", "officehome", "--split-share", "1"], "--split-share 1 leaves no image"),
    (["--dataset", "folder", "--split-share", "0.5"], "--split-share applies to --dataset officehome only"),
    (["--split-seed", "3"], "--split-seed applies to --dataset officehome only")])
def test_split_flags_that_would_empty_a_split_or_be_ignored_are_one_line(flags, fragment):
    args = w2s_clip.parse_args(["--domain", "sketch", *flags], run.build_parser())
    with pytest.raises(w2s_clip.UserError, match=fragment):
        checks.check_split_flags(args)
    checks.check_split_flags(w2s_clip.parse_args(["--dataset", "officehome", "--domain", "Art",
                                                  "--split-share", "0.5"], run.build_parser()))
