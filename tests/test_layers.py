"""The import graph of tpu_reason/, read with `ast` (nothing is imported, so this runs in well under a second):
no module imports itself back through others, counting the imports made inside functions, and the imports of
`NEVER`, the ones that would make a layer point the wrong way, do not exist."""

import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "tpu_reason"


def module_name(path: pathlib.Path) -> str:
  parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
  return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _type_checking_only(tree: ast.Module) -> set[int]:
  """The nodes under `if TYPE_CHECKING:`: imports that never run."""
  return {id(n) for node in ast.walk(tree) if isinstance(node, ast.If) and isinstance(node.test, ast.Name)
          and node.test.id == "TYPE_CHECKING" for stmt in node.body for n in ast.walk(stmt)}


def _target(name: str) -> str | None:
  """The module of the package that an imported dotted name loads (`a.b.f` -> `a.b`), None outside it."""
  while name and name not in MODULES:
    name = name.rpartition(".")[0]
  return name or None


def imports(module: str) -> dict[str, int]:
  """{module of the package: the first line that imports it} for `module`, top-level and lazy imports alike."""
  path = MODULES[module]
  tree = ast.parse(path.read_text(), str(path))
  package = module if path.name == "__init__.py" else module.rpartition(".")[0]
  skip, found = _type_checking_only(tree), {}
  for node in ast.walk(tree):
    if id(node) in skip:
      continue
    if isinstance(node, ast.Import):
      names = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:  # relative: from the package, one level up per extra dot
        base = ".".join([*package.split(".")[:len(package.split(".")) - node.level + 1], *filter(None, [base])])
      names = [f"{base}.{a.name}" for a in node.names]  # a submodule, else a name defined in `base`
    else:
      continue
    for name in names:
      target = _target(name)
      if target is not None and target != module:
        found.setdefault(target, node.lineno)
  return found


GRAPH = {m: imports(m) for m in MODULES}


def reach(module: str) -> set[str]:
  """Every module `module` loads, directly or through others."""
  seen, todo = set(), [module]
  while todo:
    for t in GRAPH[todo.pop()]:
      if t not in seen:
        seen.add(t)
        todo.append(t)
  return seen


def within(module: str, prefixes) -> bool:
  return any(module == p or module.startswith(p + ".") for p in prefixes)


def test_the_graph_is_read():
  assert len(MODULES) > 40 and "tpu_reason.plan.cli" in MODULES and "tpu_reason.data.sources.formats" in MODULES
  assert "tpu_reason.models.transformer" in GRAPH["tpu_reason.sampling.sampler"]
  assert "tpu_reason.models.hf" in GRAPH["tpu_reason.models"]  # an import inside a function counts


def test_no_import_cycles():
  """No module reaches itself (a package's face importing its own modules is no cycle: they do not import it)."""
  cycles = sorted({tuple(sorted(m for m in reach(start) if start in reach(m))) for start in MODULES
                   if start in reach(start)})
  assert not cycles, "import cycles: " + "; ".join(" <-> ".join(c) for c in cycles)


def test_the_sharding_table_and_tree_stand_on_nothing():
  """sharding (the logical-axis table, below models, losses and the sampler) imports only tree; tree nothing."""
  assert set(GRAPH["tpu_reason.sharding"]) <= {"tpu_reason.tree"}, GRAPH["tpu_reason.sharding"]
  assert not GRAPH["tpu_reason.tree"], GRAPH["tpu_reason.tree"]


# (importer, what it must never load, why): importer and imported are module prefixes (a package and all its
# modules). Direct imports are checked for every module under the importer.
NEVER = [
    (("tpu_reason.models",), ("tpu_reason.mesh", "tpu_reason.config", "tpu_reason.rewards", "tpu_reason.data",
                              "tpu_reason.sampling", "tpu_reason.losses", "tpu_reason.train"),
     "the models are below the mesh, the config and everything that runs them"),
    (("tpu_reason.mesh",), ("tpu_reason.models",), "the mesh builds meshes; the models place themselves by sharding"),
    (("tpu_reason.sampling",), ("tpu_reason.data", "tpu_reason.losses", "tpu_reason.train", "tpu_reason.loop",
                                "tpu_reason.sft", "tpu_reason.grpo"), "the sampler is below the trainers"),
    (("tpu_reason.losses",), ("tpu_reason.sampling", "tpu_reason.loop", "tpu_reason.sft", "tpu_reason.grpo"),
     "the losses are pure maths under the trainers"),
    (("tpu_reason.rewards", "tpu_reason.tags"), ("tpu_reason.models", "tpu_reason.sampling", "tpu_reason.sharding",
                                                 "tpu_reason.mesh", "tpu_reason.config"),
     "rewards and tag schemas sit below the trainers, not the config"),
    (("tpu_reason.data",), ("tpu_reason.curate", "tpu_reason.eval", "tpu_reason.sft", "tpu_reason.grpo",
                            "tpu_reason.loop"), "data preparation is below curation and the trainers"),
    (("tpu_reason.data.sources",), ("tpu_reason.config", "tpu_reason.models", "tpu_reason.data.prepare",
                                    "tpu_reason.data.examples", "tpu_reason.data.render"),
     "the readers are the bottom of data/ (choices.SOURCES names them for the config)"),
    (("tpu_reason.train", "tpu_reason.loop", "tpu_reason.sft", "tpu_reason.grpo"), ("tpu_reason.plan",),
     "the plan reads the trainers, never the other way"),
    (("tpu_reason.config", "tpu_reason.config_io"), ("tpu_reason.rewards", "tpu_reason.tags", "tpu_reason.data",
                                                     "tpu_reason.models", "tpu_reason.sharding", "tpu_reason.mesh"),
     "the schema checks names against choices' tables, which load no maths libraries"),
]
CLIS = ("tpu_reason.eval", "tpu_reason.chat", "tpu_reason.generate", "tpu_reason.export")


def broken(importers, never) -> list[str]:
  return [f"{m} imports {t} (line {line})" for m in GRAPH if within(m, importers)
          for t, line in GRAPH[m].items() if within(t, never) and not within(t, importers)]


@pytest.mark.parametrize("importers, never, why", NEVER, ids=[", ".join(n[0]) for n in NEVER])
def test_never(importers, never, why):
  assert not broken(importers, never), why


def test_the_forward_pass_loads_no_mesh_config_rewards_or_data():
  """Through every module it loads, not only its own imports (math_verify came in by config -> rewards)."""
  loaded = reach("tpu_reason.models.transformer")
  bad = ("tpu_reason.mesh", "tpu_reason.config", "tpu_reason.rewards", "tpu_reason.tags", "tpu_reason.data")
  assert not [m for m in loaded if within(m, bad)], sorted(loaded)


def test_no_module_imports_a_cli():
  """The command modules (and every `__main__`) sit on top: nothing in the package imports them."""
  clis = [m for m in MODULES if within(m, CLIS) or m.endswith(".__main__")]
  assert not [f"{m} imports {t}" for m in GRAPH for t in GRAPH[m] if t in clis and not m.endswith(".__main__")]
