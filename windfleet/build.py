"""Lay out every windfleet component the way ``gdk component build`` does.

``build(out)`` writes::

    out/recipes/<Name>-<Version>.yaml
    out/artifacts/<Name>/<Version>/<files>

which is also what ``greengrass-cli deployment create --recipeDir out/recipes
--artifactDir out/artifacts --merge Name=Version`` reads, what ``windfleet
publish`` uploads and what ``windfleet device run --recipe-dir/--artifact-dir``
deploys locally.

Artifact URIs are written exactly as gdk writes them after a build,
``s3://BUCKET_NAME/COMPONENT_NAME/COMPONENT_VERSION/<file>``; publishing
replaces the three placeholders (gdk ``component publish`` does the same).

The three code components share one artifact, ``windfleet.zip`` (Unarchive ZIP):
an importable ``windfleet/`` tree (the shared contracts and libraries, the device
runtime installer ``windfleet.device_runtime``, and ``windfleet.components`` with each
component's own ``requirements.txt``; never training, cloud or the local runtime).
Each recipe's Install step hands its component's requirements to
``windfleet.device_runtime``.  The zip is deterministic (sorted entries, fixed
timestamps), so the same code always has the same digest and re-publishing an
unchanged build is a no-op.

GDK: every code component is also a GDK project (``gdk-config.json`` + ``recipe.yaml``
beside it: ``components/<pkg>/`` for each, and the repository root for the detector).
Their ``custom_build_command`` runs ``python3 -m windfleet.build --gdk --root <repo>``
in the project folder, which builds that one component into the folder's
``greengrass-build/`` exactly where ``gdk component build`` expects it and where
``gdk component publish`` then reads it: the recipe as
``greengrass-build/recipes/<name of the project's recipe file>`` (GDK takes that name
after resolving symlinks) and the artifacts in
``greengrass-build/artifacts/<Name>/<Version>/``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import zipfile
from pathlib import Path

import yaml

from windfleet import model_contract

ROOT = Path(__file__).resolve().parent.parent
RECIPES_DIR = ROOT / "recipes"
MODEL_COMPONENT = "com.windfleet.AnomalyModel"
CODE_ARTIFACT = "windfleet.zip"
URI_PREFIX = "s3://BUCKET_NAME/COMPONENT_NAME/COMPONENT_VERSION/"
SEMVER = re.compile(r"^(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)(?:-[0-9A-Za-z.-]+)?(?:\+[0-9A-Za-z.-]+)?$")

# What goes into windfleet.zip: device code only.
_CORE_EXCLUDE = {"build.py", "demo.py", "nucleus", "__pycache__"}
# GDK project files and build output inside components/<pkg>/: not device code.
_COMPONENTS_EXCLUDE = {"gdk-config.json", "recipe.yaml", "recipe.json", "greengrass-build"}
GDK_CONFIG = "gdk-config.json"
_ZIP_DATE = (2020, 1, 25, 0, 0, 0)


class BuildError(RuntimeError):
    """A build that cannot produce a deployable layout (one-line reason)."""


def load_recipe(path: str | Path) -> dict:
    """Parse a YAML or JSON recipe file."""
    with open(path, encoding="utf-8") as fh:
        recipe = yaml.safe_load(fh)
    if not isinstance(recipe, dict) or "ComponentName" not in recipe:
        raise BuildError(f"{path}: not a Greengrass recipe")
    return recipe


def source_recipes(recipes_dir: str | Path = RECIPES_DIR) -> dict[str, dict]:
    """Component name -> parsed recipe, for every ``*.yaml`` in ``recipes_dir``."""
    recipes = {}
    for path in sorted(Path(recipes_dir).glob("*.yaml")):
        recipe = load_recipe(path)
        recipes[recipe["ComponentName"]] = recipe
    return recipes


def artifact_files(recipe: dict) -> list[str]:
    """File names of every artifact URI in the recipe (all manifests, de-duplicated)."""
    names: list[str] = []
    for manifest in recipe.get("Manifests") or []:
        for artifact in manifest.get("Artifacts") or []:
            name = artifact["Uri"].rsplit("/", 1)[-1]
            if name not in names:
                names.append(name)
    return names


def _zip_tree(zf: zipfile.ZipFile, src: Path, arc_prefix: str, exclude: set[str]) -> None:
    """Every file under ``src`` in sorted order; excluded names are pruned, never entered
    (a concurrent build may be creating or deleting a greengrass-build/ there)."""
    files = []
    for dirpath, dirnames, filenames in os.walk(src):
        dirnames[:] = [d for d in dirnames if d not in exclude and d != "__pycache__"]
        rel_dir = Path(dirpath).relative_to(src)
        files += [rel_dir / f for f in filenames if f not in exclude and not f.endswith(".pyc")]
    for rel in sorted(files, key=lambda p: p.as_posix()):
        _zip_write(zf, f"{arc_prefix}/{rel.as_posix()}", (src / rel).read_bytes())


def _zip_write(zf: zipfile.ZipFile, name: str, data: bytes) -> None:
    info = zipfile.ZipInfo(name, date_time=_ZIP_DATE)
    info.compress_type = zipfile.ZIP_DEFLATED
    info.external_attr = 0o644 << 16
    zf.writestr(info, data)


def build_code_zip(dest: Path, root: Path = ROOT) -> Path:
    """Write ``windfleet.zip``: ``windfleet/`` (core + components, each with its requirements.txt)."""
    components = root / "components"
    if not (components / "__init__.py").is_file():
        raise BuildError(f"{components}: not a package (components/__init__.py missing)")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_suffix(".tmp")
    with zipfile.ZipFile(tmp, "w") as zf:
        _zip_tree(zf, root / "windfleet", "windfleet", _CORE_EXCLUDE)
        _zip_tree(zf, components, "windfleet/components", _COMPONENTS_EXCLUDE)
    tmp.replace(dest)
    return dest


def _write_recipe(recipes_out: Path, recipe: dict) -> Path:
    size_limit = 16_000
    text = yaml.safe_dump(recipe, sort_keys=False, width=1000)
    if len(text.encode()) > size_limit:
        raise BuildError(f"{recipe['ComponentName']}: built recipe is {len(text.encode())} bytes > {size_limit}")
    path = recipes_out / f"{recipe['ComponentName']}-{recipe['ComponentVersion']}.yaml"
    path.write_text(text)
    return path


_ZIP_REF = re.compile(r"\{artifacts:decompressedPath\}/windfleet/([^\s\"']+\.(?:txt|py))")


def _check_zip_references(recipe: dict, code_zip: Path) -> None:
    """Every file a lifecycle step names inside the unpacked code zip must be in it."""
    names = set(zipfile.ZipFile(code_zip).namelist())
    for manifest in recipe.get("Manifests") or []:
        for ref in _ZIP_REF.findall(json.dumps(manifest.get("Lifecycle") or {})):
            if ref not in names:
                raise BuildError(f"{recipe['ComponentName']}: its lifecycle names {ref}, which {code_zip.name} lacks")


def _gdk_uris(recipe: dict) -> None:
    """Point every artifact URI at the gdk build placeholder form."""
    for manifest in recipe.get("Manifests") or []:
        for artifact in manifest.get("Artifacts") or []:
            artifact["Uri"] = URI_PREFIX + artifact["Uri"].rsplit("/", 1)[-1]
            # The service fills these at publish time; a stale pair would fail verification.
            artifact.pop("Digest", None)
            artifact.pop("Algorithm", None)


def build(
    out: str | Path = "greengrass-build",
    model_dir: str | Path | None = None,
    model_version: str | None = None,
    components: list[str] | None = None,
    recipes_dir: str | Path = RECIPES_DIR,
    root: Path = ROOT,
) -> dict[str, str]:
    """Build the suite into ``out``; returns ``{component name: version}`` built.

    The model component is built only from a model package (``model_dir``), its
    version taken from ``model_version`` or the model card.  ``components`` limits
    the build to those names.  Raises :class:`BuildError` on anything unusable.
    """
    out = Path(out)
    recipes = source_recipes(recipes_dir)
    wanted = components or list(recipes)
    unknown = [c for c in wanted if c not in recipes]
    if unknown:
        raise BuildError(f"unknown component(s): {', '.join(unknown)} (recipes in {recipes_dir})")
    if model_dir is None and components and MODEL_COMPONENT in components:
        raise BuildError(f"{MODEL_COMPONENT} needs a model package: pass --model DIR")
    if model_dir is None:
        wanted = [c for c in wanted if c != MODEL_COMPONENT]

    (out / "recipes").mkdir(parents=True, exist_ok=True)
    built: dict[str, str] = {}
    code_zip: Path | None = None
    for name in wanted:
        recipe = recipes[name]
        if name == MODEL_COMPONENT:
            try:
                card = model_contract.load_card(model_dir, verify=True)
            except model_contract.ModelPackageError as exc:
                raise BuildError(str(exc)) from None
            recipe["ComponentVersion"] = model_version or str(card.get("version", ""))
            defaults = recipe.setdefault("ComponentConfiguration", {}).setdefault("DefaultConfiguration", {})
            defaults.update(ModelVersion=str(card.get("version", "")), OnnxSha256=str(card.get("onnx_sha256", "")))
        version = str(recipe["ComponentVersion"])
        if not SEMVER.match(version):
            raise BuildError(f"{name}: version {version!r} is not explicit semver (NEXT_PATCH is not used offline)")
        _gdk_uris(recipe)
        art_dir = out / "artifacts" / name / version
        if art_dir.exists():
            shutil.rmtree(art_dir)
        art_dir.mkdir(parents=True)
        for file_name in artifact_files(recipe):
            if name == MODEL_COMPONENT:
                shutil.copy2(Path(model_dir) / file_name, art_dir / file_name)
            elif file_name == CODE_ARTIFACT:
                if code_zip is None:
                    code_zip = build_code_zip(art_dir / CODE_ARTIFACT, root)
                else:
                    shutil.copy2(code_zip, art_dir / CODE_ARTIFACT)
            else:
                raise BuildError(f"{name}: no rule to build artifact {file_name!r}")
        if code_zip is not None and CODE_ARTIFACT in artifact_files(recipe):
            _check_zip_references(recipe, code_zip)
        _write_recipe(out / "recipes", recipe)
        built[name] = version
    return built


def built_components(out: str | Path) -> dict[str, str]:
    """``{name: version}`` of every recipe in ``out/recipes`` (a built layout)."""
    result = {}
    for path in sorted((Path(out) / "recipes").glob("*.yaml")):
        recipe = load_recipe(path)
        result[recipe["ComponentName"]] = str(recipe["ComponentVersion"])
    return result


# ------------------------------------------------------------------ GDK projects
def gdk_project(project_dir: str | Path = ".") -> tuple[str, dict]:
    """``(component name, its gdk-config.json entry)`` of the GDK project in ``project_dir``."""
    path = Path(project_dir) / GDK_CONFIG
    try:
        config = json.loads(path.read_text())
        (name, entry), = config["component"].items()
    except (OSError, ValueError, KeyError, AttributeError) as exc:
        raise BuildError(f"{path}: not a GDK project config naming one component ({exc})") from None
    return name, entry


def gdk_recipe_file(project_dir: str | Path = ".") -> Path:
    """The recipe file GDK finds in ``project_dir``: ``recipe.json`` or ``recipe.yaml``, resolved
    as GDK resolves it (gdk/common/config/GDKProject.py), so a symlink counts under its target's name."""
    found = [p for p in (Path(project_dir) / "recipe.json", Path(project_dir) / "recipe.yaml") if p.exists()]
    if len(found) != 1:
        raise BuildError(f"{Path(project_dir).resolve()}: GDK needs exactly one of recipe.json / recipe.yaml")
    return found[0].resolve()


def build_gdk(project_dir: str | Path = ".", root: str | Path | None = None) -> tuple[str, str]:
    """What ``gdk component build`` runs (gdk-config.json's ``custom_build_command``): build the
    project's one component into ``<project_dir>/greengrass-build`` as GDK lays it out, the
    recipe under the name ``gdk component publish`` reads.  Returns ``(name, version)``."""
    project_dir = Path(project_dir)
    root = Path(root) if root is not None else ROOT
    name, entry = gdk_project(project_dir)
    recipe_file = gdk_recipe_file(project_dir)
    source = load_recipe(recipe_file)
    version = str(entry.get("version", ""))
    if source.get("ComponentName") != name:
        raise BuildError(f"{recipe_file}: names {source.get('ComponentName')!r}, {GDK_CONFIG} names {name!r}")
    if version != str(source.get("ComponentVersion")):
        raise BuildError(f"{GDK_CONFIG} has version {version!r} and {recipe_file.name} {source.get('ComponentVersion')!r}: "
                         "keep them equal (explicit semver; NEXT_PATCH is not used)")
    out = project_dir / "greengrass-build"
    built = build(out, components=[name], recipes_dir=root / "recipes", root=root)
    built_path = out / "recipes" / f"{name}-{built[name]}.yaml"
    recipe = load_recipe(built_path)
    if entry.get("author"):
        recipe["ComponentPublisher"] = entry["author"]  # as GDK's own build does
    built_path.unlink()
    target = out / "recipes" / recipe_file.name
    if recipe_file.suffix == ".json":
        target.write_text(json.dumps(recipe, indent=2) + "\n")
    else:
        target.write_text(yaml.safe_dump(recipe, sort_keys=False, width=1000))
    return name, built[name]


def main(argv: list[str] | None = None) -> int:
    """``python -m windfleet.build`` (what gdk-config.json's custom build runs)."""
    parser = argparse.ArgumentParser(prog="windfleet.build", description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="greengrass-build")
    parser.add_argument("--model", default=None, help="model package dir (model.onnx + model.json)")
    parser.add_argument("--model-version", default=None)
    parser.add_argument("--component", action="append", default=None)
    parser.add_argument("--gdk", action="store_true",
                        help="build the GDK project in the current folder (gdk-config.json's custom build)")
    parser.add_argument("--root", default=None, help="the repository root (default: this package's)")
    args = parser.parse_args(argv)
    try:
        if args.gdk:
            name, version = build_gdk(".", args.root)
            built = {name: version}
        else:
            root = Path(args.root) if args.root else ROOT
            built = build(args.out, args.model, args.model_version, args.component, root / "recipes", root)
    except BuildError as exc:
        print(f"windfleet build: {exc}", file=sys.stderr)
        return 2
    for name, version in built.items():
        print(f"{name}={version}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
