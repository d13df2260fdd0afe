"""The `flowsteer` command as a user runs it, and what a base install says when an extra is missing."""
import json
import logging
import subprocess
import sys

import pytest
import torch

from flowsteer import _optional
from flowsteer._optional import MissingDependency, require


def _proc(*args, timeout=600):
    out = subprocess.run([sys.executable, "-m", "flowsteer.cli", *args], capture_output=True, text=True,
                         timeout=timeout)
    assert out.returncode == 0, out.stderr[-2000:]
    return out


def _run(*args, timeout=600):
    return _proc(*args, timeout=timeout).stdout


def test_info_prints_backend_info():
    info = json.loads(_run("info"))
    assert {"backend", "extension", "cpu_pick", "triton"} <= set(info)


def test_quick_example_runs_and_the_ratio_is_one():
    out = _run("example")
    assert "max |ratio - 1| = 0.0e+00" in out


def test_version():
    import flowsteer

    assert _run("--version").strip() == f"flowsteer {flowsteer.__version__}"


def test_help_does_not_import_torch():
    """Parsing the command line (--help of the command and of its subcommands) loads no torch: each
    command imports what it needs when it runs."""
    code = ("import sys\nfrom flowsteer.cli import main\n"
            "for argv in (['--help'], ['bench', '--help'], ['train', '--help'], ['demo', '--help']):\n"
            "    try:\n        main(argv)\n    except SystemExit:\n        pass\n"
            "heavy = sorted(m for m in ('torch', 'numpy', 'diffusers', 'transformers') if m in sys.modules)\n"
            "print('HEAVY', heavy, file=sys.stderr)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "HEAVY []" in out.stderr, out.stderr[-2000:]
    assert "flowsteer bench" in out.stdout and "--version" in out.stdout


def _bench_parser():
    from flowsteer.cli import build_parser

    sub = next(a for a in build_parser()._actions if a.dest == "command")
    return sub.choices["bench"]


def test_every_bench_option_has_help():
    actions = [a for a in _bench_parser()._actions if a.dest != "help"]
    assert {a.dest for a in actions} >= {"what", "full", "prompts", "group_size", "branch_group_size", "steps", "size",
                                         "max_sequence_length", "device", "compile", "repeats", "out"}
    for action in actions:
        assert action.help and len(action.help) > 10, action.dest


def test_bench_sizes_quick_on_cpu_full_on_request():
    from flowsteer.cli import BENCH_SIZES, _bench_settings

    parser = _bench_parser()
    args = parser.parse_args(["rollout", "--device", "cpu"])
    assert _bench_settings(args) == "quick"
    assert {k: getattr(args, k) for k in BENCH_SIZES["rollout"]["quick"]} == BENCH_SIZES["rollout"]["quick"]
    args = parser.parse_args(["rollout", "--device", "cpu", "--full", "--steps", "3"])
    assert _bench_settings(args) == "full"
    assert args.steps == 3 and args.size == BENCH_SIZES["rollout"]["full"]["size"] == 32
    assert BENCH_SIZES["rollout"]["full"] == dict(prompts=2, group_size=8, branch_group_size=24, steps=10, size=32,
                                                  max_sequence_length=256, repeats=5)  # the size BENCHMARKS.md reports
    args = parser.parse_args(["rollout", "--device", "cuda"])
    assert _bench_settings(args) == "full"
    args = parser.parse_args(["train", "--device", "cpu"])
    assert _bench_settings(args) == "quick" and args.group_size == BENCH_SIZES["train"]["quick"]["group_size"]
    assert BENCH_SIZES["train"]["full"] == dict(prompts=2, group_size=8, steps=10, size=32, max_sequence_length=77,
                                                repeats=5)


def test_bench_rollout_smoke(tmp_path):
    path = tmp_path / "rollout.json"
    out = _proc("bench", "rollout", "--steps", "2", "--group-size", "2", "--branch-group-size", "2", "--size", "8",
                "--max-sequence-length", "16", "--device", "cpu", "--repeats", "1", "--out", str(path))
    results = json.loads(path.read_text())
    assert results["speedup"] > 0 and results["branch_speedup"] > 0
    assert "quick size; --full for the size BENCHMARKS.md reports" in out.stdout
    # the progress bar (stderr) names what it is timing
    assert "reference_loop (warm-up)" in out.stderr and "flowsteer.sample (round 1/1)" in out.stderr, out.stderr[-2000:]
    # transformers' torchvision fallback warnings, harmless here, are silenced
    assert "requires torchvision" not in out.stderr


# ------------------------------------------------------------------------------ missing extras


def _block(monkeypatch, *names):
    """Make `import NAME` fail as if NAME were not installed."""
    for name in names:
        monkeypatch.setitem(sys.modules, name, None)


def test_require_names_the_extra_and_what_needs_it(monkeypatch):
    _block(monkeypatch, "diffusers")
    with pytest.raises(ImportError, match=r"flowsteer bench needs diffusers, which is not installed: "
                                          r"pip install 'flowsteer\[diffusers\]'"):
        require("diffusers", "diffusers", "flowsteer bench")
    _block(monkeypatch, "open_clip")
    with pytest.raises(MissingDependency, match=r"HPSv2Score needs open_clip, which is not installed: "
                                                r"pip install open_clip_torch; also needs torchvision"):
        require("open_clip", None, "HPSv2Score", hint="also needs torchvision")
    assert require("json", None, "x").dumps([]) == "[]"


def test_require_tells_a_broken_install_from_a_missing_one(tmp_path, monkeypatch):
    (tmp_path / "brokenpkg_for_test.py").write_text("import no_such_module_anywhere_xyz\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(MissingDependency, match=r"installed but fails to import \(ModuleNotFoundError: No module "
                                                r"named 'no_such_module_anywhere_xyz'\)"):
        require("brokenpkg_for_test", "plot", "a test")


@pytest.mark.parametrize("argv,extra", [
    (["bench", "rollout", "--device", "cpu"], "diffusers"),
    (["bench", "train", "--device", "cpu"], "diffusers"),
    (["train", "flow_grpo", "--check"], "diffusers"),
    (["plot", "no-such-run"], "plot"),
])
def test_commands_without_their_extra_say_what_to_install(argv, extra, monkeypatch, capsys):
    from flowsteer.cli import main

    _block(monkeypatch, "diffusers", "matplotlib")
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"flowsteer {argv[0]}: " in err and f"pip install 'flowsteer[{extra}]'" in err, err


def test_jpeg_reward_without_pillow_names_the_extra(monkeypatch):
    from flowsteer.rewards import JpegCompressibility

    _block(monkeypatch, "PIL", "PIL.Image")
    with pytest.raises(ImportError, match=r"JPEG .*needs Pillow \(PIL\), which is not installed: "
                                          r"pip install 'flowsteer\[rewards\]'"):
        JpegCompressibility()(torch.rand(2, 3, 8, 8))


def test_remote_reward_without_pillow(monkeypatch):
    """PNG needs Pillow and says so when the client is built; encoding='uint8' needs none on either side."""
    from flowsteer.rewards import RemoteReward, serve
    from flowsteer.testing.rewards import brightness

    _block(monkeypatch, "PIL", "PIL.Image")
    with pytest.raises(ImportError, match=r"RemoteReward\(encoding='png'\).*pip install 'flowsteer\[rewards\]'.*"
                                          r"encoding='uint8'"):
        RemoteReward("http://127.0.0.1:1")
    RemoteReward("http://127.0.0.1:1", input="latents")  # latents never need Pillow
    x = torch.rand(3, 3, 8, 8)
    with serve(brightness) as server:
        got = RemoteReward(server.url, encoding="uint8")(x, None)
    assert torch.allclose(got, brightness(x, None), atol=1 / 255)


def test_clip_rewards_without_transformers_name_the_extra(tmp_path, monkeypatch):
    from flowsteer.rewards import CLIPScore

    (tmp_path / "config.json").write_text("{}")
    _block(monkeypatch, "transformers")
    with pytest.raises(ImportError, match=r"CLIPScore .*needs transformers, which is not installed: "
                                          r"pip install 'flowsteer\[rewards\]'"):
        CLIPScore(str(tmp_path))


def test_torchvision_fallback_warning_is_filtered_and_nothing_else():
    """`import flowsteer` installs the filter (test_bench_rollout_smoke checks the real warning is gone)."""

    log = logging.getLogger("transformers.utils.import_utils")
    assert _optional._FILTER in log.filters

    def record(msg):
        return logging.LogRecord(log.name, logging.WARNING, __file__, 1, msg, None, None)

    quiet = ("`CLIPImageProcessor` requires torchvision (not installed); falling back to `CLIPImageProcessorPil` for "
             "backward compatibility.")
    assert not _optional._FILTER.filter(record(quiet))
    assert not _optional._FILTER.filter(record(quiet.replace("CLIP", "Siglip")))
    assert _optional._FILTER.filter(record(quiet.replace("CLIP", "Vit")))  # not one flowsteer knows to be harmless
    assert _optional._FILTER.filter(record("some other warning"))


def test_chat_judge_images_without_pillow_name_the_extra(monkeypatch):
    from flowsteer.rewards.chat import image_data_url

    _block(monkeypatch, "PIL", "PIL.Image")
    with pytest.raises(ImportError, match=r"ChatJudge .*needs Pillow \(PIL\), which is not installed: "
                                          r"pip install 'flowsteer\[rewards\]'"):
        image_data_url(torch.rand(3, 8, 8))


def test_testing_pipelines_without_diffusers_name_the_extra(monkeypatch):
    monkeypatch.delitem(sys.modules, "flowsteer.testing.pipelines", raising=False)
    _block(monkeypatch, "diffusers")
    with pytest.raises(ImportError, match=r"flowsteer\.testing\.pipelines .*needs diffusers, which is not installed: "
                                          r"pip install 'flowsteer\[diffusers\]'"):
        import flowsteer.testing.pipelines  # noqa: F401
