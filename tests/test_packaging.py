"""setup.py against the code and the installed environment: the transformers floor, the console scripts,
the package data a wheel ships. Reads setup.py's arguments without building anything (a few seconds, most
of it importing the console scripts' modules)."""
import importlib
import importlib.metadata as md
import inspect
import os

import pytest
import setuptools
from packaging.requirements import Requirement
from packaging.version import Version

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
    for folder in ("wavllm_fairseq/serve/static", "wavllm_fairseq/toy/data"):
        on_disk = {os.path.normpath(os.path.join(folder, f)) for f in os.listdir(os.path.join(ROOT, folder))
                   if os.path.isfile(os.path.join(ROOT, folder, f))}
        assert on_disk, f"{folder} is empty"
        assert on_disk <= shipped, f"not in package_data: {sorted(on_disk - shipped)}"
