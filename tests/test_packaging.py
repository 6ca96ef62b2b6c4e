"""setup.py against the code and the installed environment: the transformers floor, the console scripts,
the package data a wheel ships, the licence. Most tests read setup.py's arguments without building anything;
the slow one installs the package into a fresh virtualenv and runs it from outside the checkout."""
import importlib
import importlib.metadata as md
import inspect
import os
import shutil
import subprocess
import sys

import pytest
import setuptools
from packaging.requirements import Requirement
from packaging.version import Version

from helpers import require_installed, require_program

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The first transformers release whose models take the key/value cache as `cache=` (generator.py's LLM call
# passes it so). Older releases name it `past_key_values` and take anything else into **kwargs: the
# generator's cache stays empty and decoding fails (5.23.0: tests/test_generator.py fails at its first
# cached test; 5.24.0: test_generator, test_static_decode, test_model, test_backbones, test_tokenizer pass).
TRANSFORMERS_FLOOR = "5.24"


def _declared() -> dict:
    """The keyword arguments setup.py passes to setuptools.setup (setup() itself is not run)."""
    kwargs = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(setuptools, "setup", lambda **kw: kwargs.update(kw))
        mp.chdir(ROOT)  # find_packages() looks in the working directory
        path = os.path.join(ROOT, "setup.py")
        with open(path) as f:
            exec(compile(f.read(), path, "exec"), {"__name__": "__main__", "__file__": path})
    return kwargs


@pytest.fixture(scope="module")
def declared() -> dict:
    return _declared()


def _requirement(declared, name: str) -> Requirement:
    reqs = [Requirement(r) for r in declared["install_requires"]]
    found = [r for r in reqs if r.name == name]
    assert len(found) == 1, f"setup.py should declare {name} once in install_requires"
    return found[0]


def test_transformers_floor_is_the_first_release_with_the_cache_argument(declared):
    req = _requirement(declared, "transformers")
    assert str(req.specifier) == f">={TRANSFORMERS_FLOOR}", (
        f"setup.py declares {req}; the floor the generator needs is {TRANSFORMERS_FLOOR} (see TRANSFORMERS_FLOOR)")
    from transformers.models.llama.modeling_llama import LlamaModel

    # what sets the floor, in the installed release: the generator's `cache=` is a named argument
    assert "cache" in inspect.signature(LlamaModel.forward).parameters


def test_installed_versions_satisfy_setup_py(declared):
    """Every requirement of the package (and of the extras install.sh installs) is installed at a version
    setup.py allows: a stale environment fails here, by name, rather than somewhere in a model test."""
    extras = declared["extras_require"]
    bad = []
    for text in declared["install_requires"] + extras["test"] + extras["bertscore"]:
        req = Requirement(text)
        try:
            have = md.version(req.name)
        except md.PackageNotFoundError:
            bad.append(f"{req}: not installed")
            continue
        if not req.specifier.contains(Version(have), prereleases=True):
            bad.append(f"{req}: {have} installed")
    assert not bad, f"run examples/wavllm/scripts/install.sh: {bad}"


def test_console_scripts_resolve_to_callables(declared):
    entries = declared["entry_points"]["console_scripts"]
    names = [e.split("=")[0].strip() for e in entries]
    assert len(names) == len(set(names)), f"a console script is declared twice: {names}"
    for entry in entries:
        name, target = (s.strip() for s in entry.split("="))
        module, _, attr = target.partition(":")
        assert attr, f"{name}: {target!r} names no function (module:function)"
        obj = importlib.import_module(module)
        for part in attr.split("."):
            obj = getattr(obj, part, None)
            assert obj is not None, f"{name}: {module} has no {attr}"
        assert callable(obj), f"{name}: {target} is not callable"


def test_package_data_ships_the_serving_page_and_the_toy_tables(declared):
    """setuptools' own build_py resolves package_data (what a wheel/sdist gets): every pattern matches a
    file, and every file in the data folders is matched (none left out of a wheel)."""
    from setuptools.dist import Distribution

    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(ROOT)
        dist = Distribution({"name": declared["name"], "packages": declared["packages"],
                             "package_data": declared["package_data"]})
        build_py = dist.get_command_obj("build_py")
        build_py.ensure_finalized()
        # without the manifest: include_package_data is off, so package_data alone decides (and nothing is
        # written: the manifest would need egg_info)
        shipped = {os.path.normpath(os.path.join(src, f))
                   for _, src, _, files in build_py.get_data_files_without_manifest() for f in files}
    for package, patterns in declared["package_data"].items():
        pkg_dir = os.path.join(*package.split("."))
        for pattern in patterns:
            folder = os.path.dirname(os.path.join(pkg_dir, pattern))
            matched = {p for p in shipped if os.path.dirname(p) == os.path.normpath(folder)}
            assert matched, f"package_data {package}: {pattern!r} matches no file"
    for folder in ("wavllm_fairseq/serve/static", "wavllm_fairseq/toy/data", "wavllm_fairseq/data/prompts",
                   "wavllm_fairseq/toy/config/toy", "wavllm_fairseq/toy/config/small_real"):
        on_disk = {os.path.normpath(os.path.join(folder, f)) for f in os.listdir(os.path.join(ROOT, folder))
                   if os.path.isfile(os.path.join(ROOT, folder, f))}
        assert on_disk, f"{folder} is empty"
        assert on_disk <= shipped, f"not in package_data: {sorted(on_disk - shipped)}"


def test_the_licence_is_mit_in_the_file_and_the_metadata(declared):
    with open(os.path.join(ROOT, "LICENSE")) as f:
        text = f.read()
    assert text.startswith("MIT License") and "Copyright (c) 2026 the wavllm_fairseq authors" in text
    assert declared["license"] == "MIT" and "License :: OSI Approved :: MIT License" in declared["classifiers"]


def test_what_install_sh_installs_is_skipped_when_missing_but_fails_under_ci(monkeypatch):
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="package no_such_module_here is not installed"):
        require_installed("numpy", "no_such_module_here")
    with pytest.raises(pytest.fail.Exception, match="no-such-program-here is not installed"):
        require_program("no-such-program-here")
    monkeypatch.setenv("CI", "false")
    with pytest.raises(pytest.skip.Exception, match="install.sh installs it"):
        require_installed("no_such_module_here")
    monkeypatch.delenv("CI")
    with pytest.raises(pytest.skip.Exception):
        require_program("no-such-program-here")
    require_installed("numpy")  # present: nothing happens
    assert os.path.isfile(require_program("no-such-program-here", "sh"))


# ------------------------------------------------------------------ a real install, outside the checkout
def _wheel_sources(dst: str) -> str:
    """What a wheel is built from (setup.py, pyproject.toml, LICENSE and the package), copied to ``dst``, so
    that building leaves nothing (build/, *.egg-info) in the checkout."""
    for name in ("setup.py", "pyproject.toml", "LICENSE"):
        shutil.copy(os.path.join(ROOT, name), dst)
    shutil.copytree(os.path.join(ROOT, "wavllm_fairseq"), os.path.join(dst, "wavllm_fairseq"),
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return dst


# run by the installed package: where it is; that the data files the toy reads are there
INSTALLED_PACKAGE = "import os, wavllm_fairseq; print(os.path.dirname(os.path.abspath(wavllm_fairseq.__file__)))"
INSTALLED_DATA = """
import os
from wavllm_fairseq.toy import pipeline, stage0, tables
assert all(os.path.isfile(f) for f in stage0.code_files())  # the prompt pools and the toy's tables among them
for name in ("toy", "small_real"):
    recipe = pipeline.Recipe(name, {})
    for stage in (1, 2):
        assert os.path.isfile(os.path.join(recipe.config_dir, recipe.config_name(stage) + ".yaml")), (name, stage)
assert all(seen and unseen for seen, unseen in tables.prompt_pools().values())
"""


@pytest.mark.slow
def test_a_wheel_installed_outside_the_checkout_runs_every_console_script(declared, tmp_path):
    """``pip install`` (not editable) into a fresh virtualenv that sees the machine's packages (torch, fairseq
    ...) but not this checkout; from a folder outside it every console script answers ``--help``, the
    prompt pools, the toy's tables and yamls are there, and the toy corpus builds."""
    src, venv, cwd = tmp_path / "src", tmp_path / "venv", tmp_path / "elsewhere"
    src.mkdir()
    cwd.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    # --without-pip: the machine's pip and setuptools (a venv's own, from ensurepip, may be too old to build)
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(venv)], check=True,
                   env=env)
    bin_dir = venv / "bin"
    py = str(bin_dir / "python")
    out = subprocess.run([py, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--no-index",
                          _wheel_sources(str(src))], capture_output=True, text=True, cwd=cwd, env=env, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]

    def run(cmd, timeout=300):
        res = subprocess.run(cmd, capture_output=True, text=True, cwd=cwd, env=env, timeout=timeout)
        assert res.returncode == 0, f"{cmd}: {res.stdout[-2000:]}{res.stderr[-3000:]}"
        return res.stdout

    package = run([py, "-c", INSTALLED_PACKAGE]).strip().splitlines()[-1]
    assert package.startswith(str(venv)) and not package.startswith(ROOT), package
    for entry in declared["entry_points"]["console_scripts"]:
        name = entry.split("=")[0].strip()
        assert "usage:" in run([str(bin_dir / name), "--help"]), name
    assert "usage: wavllm-toy-pretrain" in run([py, "-m", "wavllm_fairseq.toy.stage0", "--help"])
    run([py, "-c", INSTALLED_DATA])
    run([str(bin_dir / "wavllm-make-toy-corpus"), "--out", "corpus", "--size", "small", "--jobs", "1"], timeout=900)
    corpus = cwd / "corpus"
    assert (corpus / "corpus.json").is_file() and (corpus / "test_asr.tsv").is_file()
    with open(corpus / "prompts" / "asr.seen.txt", "rb") as f, \
            open(os.path.join(ROOT, "wavllm_fairseq", "data", "prompts", "asr.seen.txt"), "rb") as g:
        assert f.read() == g.read()
