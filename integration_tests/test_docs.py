"""The docs stay true: the API reference covers the public names, examples run, the walkthrough works.

Most checks read the Markdown and the docstrings and build nothing. One checks a built site, when
``TOKRED_SITE_DIR`` points at it::

    uv run --group docs mkdocs build --strict --site-dir /tmp/site
    TOKRED_SITE_DIR=/tmp/site uv run pytest -q integration_tests/test_docs.py -k built_site
"""

import ast
import doctest
import html
import importlib
import inspect
import os
import pkgutil
import re
from pathlib import Path

import pytest

import tokred.core
from tokred.core.registry import REDUCERS

from .walkthrough import install_walkthrough, run_python

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
PACKAGES = ("tokred.core", "tokred.vlm", "tokred.mamba", "tokred.bench")
FENCE = re.compile(r"^```(\w+)([^\n]*)\n(.*?)^```", re.M | re.S)
DIRECTIVE = re.compile(r"^::: ([\w.]+)\n((?:[ \t]+.*\n)*)", re.M)
SNIPPET = re.compile(r'^--8<-- "([^"]+)"', re.M)
# Sphinx cross-reference roles; tokred's docstrings write cross-references as [`name`][dotted.path] instead.
ROLES = ("func", "class", "meth", "attr", "data", "mod", "exc", "obj")
SPHINX_ROLE = re.compile(rf":(?:py:)?(?:{'|'.join(ROLES)}):`")
# The same role in a page's text once the HTML tags are stripped (`:func:`x`` renders as :func:<code>x</code>).
RENDERED_ROLE = re.compile(rf":(?:py:)?(?:{'|'.join(ROLES)}):[`\w]")
# Material's content column at 1280 px holds about 110 characters of table row; 140 leaves room for links.
MAX_TABLE_ROW = 140


def markdown_pages():
    return sorted(DOCS.rglob("*.md"))


def generated(page: Path) -> bool:
    """Written by `tokred bench --out docs/results` (and included by results/index.md), not by hand."""
    return page.parent == DOCS / "results" and page.name != "index.md"


def code_blocks(page: Path):
    """(language, title or None, code) for every fenced block of a Markdown page."""
    for lang, info, code in FENCE.findall(page.read_text()):
        title = re.search(r'title="([^"]+)"', info)
        yield lang, title.group(1) if title else None, code


def prose_lines(page: Path):
    """(line number, line) of a page outside its fenced code blocks."""
    fenced = False
    for number, line in enumerate(page.read_text().splitlines(), 1):
        if line.lstrip().startswith("```"):
            fenced = not fenced
            continue
        if not fenced:
            yield number, line


def public_modules(package):
    yield package.__name__
    for info in pkgutil.walk_packages(package.__path__, package.__name__ + "."):
        if not any(part.startswith("_") for part in info.name.split(".")):
            yield info.name


def all_public_modules():
    return [name for package in PACKAGES for name in public_modules(importlib.import_module(package))]


def resolve(path: str):
    """The object a dotted path names: a module, or an attribute of the longest importable module prefix."""
    parts = path.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ModuleNotFoundError:
            continue
        for attr in parts[cut:]:
            obj = getattr(obj, attr)
        return obj
    raise ImportError(path)


def rendered_objects():
    """id() of every object a `::: path` block under docs/api renders (a module's members unless members: false)."""
    found = set()
    for page in (DOCS / "api").rglob("*.md"):
        for path, options in DIRECTIVE.findall(page.read_text()):
            obj = resolve(path)
            found.add(id(obj))
            if not inspect.ismodule(obj) or "members: false" in options:
                continue
            listed = re.findall(r"^\s+- (\w+)\s*$", options, re.M)  # an explicit `members:` list
            names = listed or getattr(obj, "__all__", None) or [n for n in vars(obj) if not n.startswith("_")]
            found.update(id(getattr(obj, name)) for name in names if hasattr(obj, name))
    return found


@pytest.mark.parametrize("package", PACKAGES)
def test_api_reference_shows_every_public_name(package):
    rendered = rendered_objects()
    missing = []
    for name in public_modules(importlib.import_module(package)):
        module = importlib.import_module(name)
        for attr in getattr(module, "__all__", []):
            if attr.startswith("_"):
                continue
            if id(getattr(module, attr)) not in rendered:
                missing.append(f"{name}.{attr}")
    assert not missing, "add a ::: block to docs/api for: " + ", ".join(sorted(set(missing)))


def test_public_modules_declare_all():
    for name in public_modules(tokred.core):
        assert hasattr(importlib.import_module(name), "__all__"), f"{name} has no __all__"


def docstrings(tree: ast.AST):
    """(line, text) of every docstring of a module: its own, its classes' and functions', and attribute docstrings.

    An attribute docstring is a bare string after an assignment, so every bare string statement counts.
    """
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        for statement in body if isinstance(body, list) else ():
            if (
                isinstance(statement, ast.Expr)
                and isinstance(statement.value, ast.Constant)
                and isinstance(statement.value.value, str)
            ):
                yield statement.lineno, statement.value.value


@pytest.mark.parametrize("package", PACKAGES)
def test_docstrings_use_no_sphinx_roles(package):
    """mkdocstrings renders Markdown cross-references as links and Sphinx roles as raw text."""
    found = []
    for name in public_modules(importlib.import_module(package)):
        path = Path(importlib.import_module(name).__file__)
        for line, text in docstrings(ast.parse(path.read_text(), str(path))):
            for match in SPHINX_ROLE.finditer(text):
                found.append(f"{path.relative_to(ROOT)}:{line} ({name}): {match.group(0)}")
    assert not found, "write [`name`][dotted.path] instead of Sphinx roles:\n" + "\n".join(found)


SITE = os.environ.get("TOKRED_SITE_DIR")


@pytest.mark.skipif(not SITE, reason="set TOKRED_SITE_DIR to a site built with mkdocs build --site-dir DIR")
def test_built_site_shows_no_sphinx_roles():
    site = Path(SITE)
    assert (site / "index.html").is_file(), f"TOKRED_SITE_DIR={SITE} holds no built site"
    found = []
    for page in sorted([*site.rglob("*.html"), *site.rglob("search_index.json")]):
        text = html.unescape(re.sub(r"<[^>]+>", "", page.read_text(encoding="utf-8", errors="replace")))
        for match in RENDERED_ROLE.finditer(text):
            context = text[max(0, match.start() - 40) : match.end() + 40].replace("\n", " ")
            found.append(f"{page.relative_to(site)}: ...{context}...")
    assert not found, "raw Sphinx roles in the built site:\n" + "\n".join(found[:50])


# reST that Markdown renders as text: a literal-block marker ending a paragraph, a grid table's border, and a
# Google "Example:" section that griffe turns into an admonition instead of a highlighted console session.
RENDERED_REST = re.compile(r"::</p>|<p>=+ =+|<p class=\"admonition-title\">Example</p>")


@pytest.mark.skipif(not SITE, reason="set TOKRED_SITE_DIR to a site built with mkdocs build --site-dir DIR")
def test_built_site_shows_no_restructured_text():
    site = Path(SITE)
    found = [
        f"{page.relative_to(site)}: {match.group(0)}"
        for page in sorted(site.rglob("*.html"))
        for match in RENDERED_REST.finditer(page.read_text(encoding="utf-8", errors="replace"))
    ]
    assert not found, "reST shown as text in the built site; use Markdown:\n" + "\n".join(found[:50])


def nav_pages():
    """The pages named in mkdocs.yml's nav."""
    config = (ROOT / "mkdocs.yml").read_text()
    nav = config[config.index("\nnav:\n") :]
    return set(re.findall(r"^\s*- (?:[^\n]*?: )?([\w./-]+\.md)\s*$", nav, re.M))


def test_every_page_is_in_the_nav():
    in_nav = nav_pages()
    included = set()
    for page in in_nav:
        if (DOCS / page).is_file():
            snippets = SNIPPET.findall((DOCS / page).read_text())
            included.update(path.removeprefix("docs/") for path in snippets if path.startswith("docs/"))
    missing = []
    for page in markdown_pages():
        name = page.relative_to(DOCS).as_posix()
        if name in in_nav or name in included or name == "results/results.md":  # all suites' tables together
            continue
        missing.append(name)
    assert not missing, "add these pages to the nav of mkdocs.yml: " + ", ".join(missing)
    absent = sorted(page for page in in_nav if not (DOCS / page).is_file())
    assert not absent, "the nav of mkdocs.yml names pages that do not exist: " + ", ".join(absent)


def test_tables_fit_the_page():
    too_wide = []
    for page in markdown_pages():
        if generated(page):
            continue
        for number, line in prose_lines(page):
            if line.lstrip().startswith("|") and len(line) > MAX_TABLE_ROW:
                too_wide.append(f"docs/{page.relative_to(DOCS).as_posix()}:{number} ({len(line)} characters)")
    assert not too_wide, (
        f"table rows longer than {MAX_TABLE_ROW} characters do not fit a 1280-px screen; shorten the cells, drop "
        "a column or split the table:\n" + "\n".join(too_wide)
    )


@pytest.mark.parametrize("name", all_public_modules())
def test_docstring_examples_run(name, monkeypatch):
    # Examples may register reducers; keep that out of the process-wide registry.
    monkeypatch.setattr(REDUCERS, "_objects", dict(REDUCERS._objects))
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.NORMALIZE_WHITESPACE | doctest.ELLIPSIS)
    assert result.failed == 0


EXAMPLE_PAGES = [
    "index.md",
    "getting-started.md",
    "reducers.md",
    "vlm/index.md",
    "vlm/attach.md",
    "vlm/apet.md",
    "vlm/models/llava.md",
    "vlm/models/llava-next.md",
    "vlm/models/qwen2-vl.md",
    "vlm/models/llava-onevision.md",
    "vlm/models/video-llava.md",
    "mamba/index.md",
    "mamba/models.md",
    "mamba/attach.md",
    "mamba/mtr.md",
    "bench/scenes.md",
    "bench/reference-llava.md",
    "bench/reference-vim.md",
    "api/bench/visualize.md",
]


def runnable_blocks(page: Path):
    """The examples of a page: fenced Python blocks without a title (titled blocks are files, not run here)."""
    return [code for lang, title, code in code_blocks(page) if lang == "python" and title is None]


def test_every_page_with_examples_runs_them():
    pages = {page.relative_to(DOCS).as_posix() for page in markdown_pages() if runnable_blocks(page)}
    assert not pages - set(EXAMPLE_PAGES), "add to EXAMPLE_PAGES: " + ", ".join(sorted(pages - set(EXAMPLE_PAGES)))


@pytest.mark.parametrize("page", EXAMPLE_PAGES)
def test_page_examples_run(page, monkeypatch):
    monkeypatch.setattr(REDUCERS, "_objects", dict(REDUCERS._objects))
    namespace = {}
    blocks = runnable_blocks(DOCS / page)
    assert blocks, f"{page} has no Python example"
    for code in blocks:
        exec(compile(code, f"docs/{page}", "exec"), namespace)


def test_readme_commands_match_the_ci_script():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    test_command = re.search(r"^uv run pytest.*$", readme, re.M)
    assert test_command and test_command.group(0) in ci, "the README's test command must be what CI runs"
    run_command = re.search(r"^uv run tokred demo$", readme, re.M)
    assert run_command and "uv run tokred demo --out" in ci, "CI must run the README's main command"


def test_adding_a_reducer_walkthrough(tmp_path):
    """Follow docs/contributing/adding-a-reducer.md literally: write its files, install, test, list."""
    files = {title: code for _, title, code in code_blocks(DOCS / "contributing" / "adding-a-reducer.md") if title}
    assert set(files) == {"src/outlier_reducer/__init__.py", "pyproject.toml", "tests/test_outlier.py"}
    env = install_walkthrough(files, tmp_path)
    tests = run_python(tmp_path, env, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests")
    assert tests.returncode == 0, tests.stdout[-3000:] + tests.stderr[-3000:]
    assert re.search(r"\d+ passed", tests.stdout)
    assert "failed" not in tests.stdout.splitlines()[-1]

    listing = run_python(tmp_path, env, "-m", "tokred.core.cli.main", "reducers", timeout=120)
    assert listing.returncode == 0, listing.stderr
    row = next(line for line in listing.stdout.splitlines() if line.startswith("outlier "))
    assert "outlier-reducer" in row and "farthest from their set's mean" in row
