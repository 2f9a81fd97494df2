"""Generated source, formatted as `ruff format` would format it, without running ruff.

The templates and the table writer lay generated code out the way ruff does already (one
argument per line in the expanded tables, a trailing comma after each); what they cannot know
in advance is which lines grow past the line limit, and the string quotes ruff prefers. This
module settles both: `quote` writes a string literal as ruff normalizes it, and `fit_lines`
splits every line over the limit at its outermost brackets, then at its commas, as ruff's
right-hand split does, and folds mappings and calls left empty onto one line. A test holds the
result byte-identical to `ruff format` on every machine of the repository and on generated
ones, so ruff is needed to develop autonomic, not to run it.
"""

from __future__ import annotations

import ast
import re
import unicodedata

LINE_LENGTH = 100

# `NAME = frozen_map(\n    dict[...](\n        {\n        }\n    )\n)` with nothing inside:
# ruff joins what has no magic trailing comma, and the empty mapping then fits on one line.
_EMPTY_MAPPING = re.compile(
    r"^(?P<head>[A-Z_]+ = frozen_map\()\n"
    r"    (?P<type>dict\[.*\]\()\n"
    r"        \{\n        \}\n    \)\n\)$",
    re.MULTILINE,
)


def quote(value: str) -> str:
    """A str literal as ruff writes it: in double quotes, unless they need more escapes than
    the single quotes that `repr` chose."""
    literal = repr(value)
    if literal[0] == '"':
        return literal
    inner = literal[1:-1]
    unescaped = inner.replace("\\'", "'")
    if '"' not in inner:
        return f'"{unescaped}"'
    if unescaped.count('"') > inner.count("\\'"):
        return literal
    return '"' + unescaped.replace('"', '\\"') + '"'


class Unsure(Exception):
    """A line of a shape this module does not know how ruff would split: generation keeps
    it as written (valid Python), and the tests that compare with ruff would name it."""


def fit_lines(source: str, *, strict: bool = True) -> str:
    """`source` with empty mappings folded and every line over the limit split; Unsure
    where ruff's choice is not certain (with `strict` off, such a line stays as it is)."""
    return fit_lines_split(source, strict=strict)[0]


def fit_lines_split(source: str, *, strict: bool = True) -> tuple[str, bool]:
    """`fit_lines`, and whether it split any line (False: every line fitted as written, so
    none is left over the limit; a large module need not be scanned for one again)."""
    if "        {\n        }\n" in source:
        source = _fold_empty_mappings(source)
    lines = source.split("\n")
    # A wide character counts 2 columns: only ASCII text is decided by lengths alone.
    if max(map(len, lines)) <= LINE_LENGTH and (source.isascii() or all(map(_fits, lines))):
        return source, False
    out: list[str] = []
    in_docstring = False
    for line in lines:
        stripped = line.strip()
        if stripped.startswith('"""'):
            # Docstrings are kept as written; only the module's spans several lines.
            if stripped == '"""' or not (len(stripped) > 3 and stripped.endswith('"""')):
                in_docstring = not in_docstring
            out.append(line)
        elif in_docstring or _fits(line):
            out.append(line)
        else:
            try:
                out.extend(_split(line))
            except Unsure:
                if strict:
                    raise
                out.append(line)
    return "\n".join(out), True


def _fold_empty_mappings(source: str) -> str:
    """`_EMPTY_MAPPING` replaced where it matches; tried only at the few `= frozen_map(`
    lines (a regular expression tried at every line start took a tenth of a large build)."""
    out: list[str] = []
    done = 0
    at = source.find(" = frozen_map(\n")
    while at >= 0:
        start = source.rfind("\n", 0, at) + 1
        found = _EMPTY_MAPPING.match(source, start)
        if found is not None:
            out += [source[done:start], f"{found['head']}{found['type']}{{}}))"]
            done = found.end()
        at = source.find(" = frozen_map(\n", max(at + 1, done))
    out.append(source[done:])
    return "".join(out)


def _fits(line: str) -> bool:
    if line.isascii():
        return len(line) <= LINE_LENGTH
    return _width(line) <= LINE_LENGTH


def _width(line: str) -> int:
    """Display width, as ruff counts it: wide East Asian characters 2, combining marks 0."""
    if line.isascii():
        return len(line)
    return sum(
        0 if unicodedata.combining(c) else 2 if unicodedata.east_asian_width(c) in "WF" else 1
        for c in line
    )


def _split(line: str) -> list[str]:
    """One line over the limit: `[key=]expression[,]` or `key: expression,` split at its
    brackets; anything else (a comment, a docstring line, an atom) stays as it is."""
    stripped = line.lstrip(" ")
    if stripped.startswith("#"):
        return [line]
    indent = len(line) - len(stripped)
    if stripped.startswith("def "):
        return _split_def(indent, stripped)
    if (bases := _CLASS.fullmatch(stripped)) is not None:
        # ruff splits a class line at its bases, the sole base on a line of its own.
        pad = " " * indent
        return [f"{pad}class {bases['name']}(", f"{pad}    {bases['bases']}", f"{pad}):"]
    suffix = "," if stripped.endswith(",") else ""
    core = stripped[: len(stripped) - len(suffix)]
    field = _FIELD.fullmatch(core)
    if field is not None and (suffix == "" or field["default"] is None):
        return _split_field(indent, field, suffix)
    if core.endswith(": (") and _is_expression(core[:-3]):
        # A mapping key too long for its line, its value opening on the same line.
        keyed: list[str] = []
        _format(indent, "", ast.parse(core[:-3], mode="eval").body, ": (", core[:-3], keyed)
        return keyed
    prefix = ""
    key, equals, rest = core.partition("=")
    if equals and key.isidentifier() and not rest.startswith("="):
        prefix, core = key + "=", rest
    elif equals and key[:-1].isidentifier() and key[-1:] == " " and rest[:1] == " ":
        # `NAME = value`: a value that cannot be split is put in parentheses if it then fits.
        prefix, core = key + "= ", rest[1:]
        if _ATOM.fullmatch(core) and indent + 4 + _width(core) <= LINE_LENGTH:
            pad = " " * indent
            return [f"{pad}{prefix}(", f"{pad}    {core}", f"{pad})"]
    else:
        key, colon, rest = core.partition(": ")
        if colon and _is_expression(key) and _is_expression(rest):
            prefix, core = key + ": ", rest
    try:
        tree = ast.parse(core, mode="eval")
    except SyntaxError:
        return [line]
    out: list[str] = []
    _format(indent, prefix, tree.body, suffix, core, out)
    return out


# A payload field: `name: annotation` or `name: annotation = None` (in a class body).
_FIELD = re.compile(r"(?P<name>[A-Za-z_][A-Za-z0-9_]*): (?P<annotation>.+?)(?P<default> = None)?")


def _split_field(indent: int, field: re.Match[str], suffix: str = "") -> list[str]:
    """A payload field too long for its line: `name: Literal[...]` split at the brackets;
    with a default, `name: (` + the annotation + `) = None`, its `| None` on a line of its
    own when the whole does not fit (ruff parenthesizes an annotation that has a default)."""
    annotation = field["annotation"]
    try:
        tree = ast.parse(annotation, mode="eval").body
    except SyntaxError:
        raise Unsure(field.group()) from None
    pad = " " * indent
    out: list[str] = []
    if field["default"] is None:
        _format(indent, field["name"] + ": ", tree, suffix, annotation, out)
        return out
    inner = indent + 4
    out.append(f"{pad}{field['name']}: (")
    if inner + _width(annotation) <= LINE_LENGTH:
        out.append(" " * inner + annotation)
    elif isinstance(tree, ast.BinOp) and isinstance(tree.op, ast.BitOr):
        _format(inner, "", tree.left, "", annotation, out)
        out.append(" " * inner + "| " + _text(tree.right, annotation))
    else:
        raise Unsure(field.group())
    out.append(pad + ")" + field["default"])
    return out


_CLASS = re.compile(
    r"class (?P<name>[A-Za-z_][A-Za-z0-9_]*)\((?P<bases>[A-Za-z_][A-Za-z0-9_.]*)\):"
)
# A value ruff cannot split: a string or a dotted name.
_ATOM = re.compile(r'"(?:[^"\\]|\\.)*"|[A-Za-z_][A-Za-z0-9_.]*')
_DEF = re.compile(r"def (?P<name>[A-Za-z_][A-Za-z0-9_]*)\((?P<params>.*)\)(?P<tail> -> .+: \.\.\.)")


def _split_def(indent: int, stripped: str) -> list[str]:
    """A long one-line method stub (`def name(self, context: T, /) -> object: ...`): its
    parameters on one line if they fit, else one per line, a long annotation split at its
    brackets."""
    match = _DEF.fullmatch(stripped)
    if match is None:
        raise Unsure(stripped)
    params = match["params"]
    try:
        arguments = ast.parse(f"def f({params}): pass").body[0].args  # type: ignore[attr-defined]
    except SyntaxError:
        raise Unsure(stripped) from None
    source = f"def f({params}): pass"
    items = [_text(a, source) for a in arguments.posonlyargs]
    if arguments.posonlyargs:
        items.append("/")
    items += [_text(a, source) for a in arguments.args]
    if arguments.vararg or arguments.kwonlyargs or arguments.kwarg or arguments.defaults:
        raise Unsure(stripped)
    pad, inner = " " * indent, " " * (indent + 4)
    out = [f"{pad}def {match['name']}("]
    body = ", ".join(items)
    if indent + 4 + _width(body) <= LINE_LENGTH:
        out.append(inner + body)
    else:
        for arg, text in zip([*arguments.posonlyargs, None, *arguments.args], items, strict=False):
            if (
                indent + 4 + _width(text) + 1 <= LINE_LENGTH
                or arg is None
                or arg.annotation is None
            ):
                out.append(f"{inner}{text},")
                continue
            annotation = arg.annotation
            if not isinstance(annotation, ast.Subscript):
                raise Unsure(stripped)
            # Split at its brackets even when the index alone is too long (a long name); a
            # union that does not fit then goes one member a line, each after its `|`.
            index = _text(annotation.slice, source)
            out.append(f"{inner}{arg.arg}: {_text(annotation.value, source)}[")
            deeper = " " * (indent + 8)
            if indent + 8 + _width(index) <= LINE_LENGTH:
                out.append(deeper + index)
            else:
                members = _union_members(annotation.slice)
                out.append(deeper + _text(members[0], source))
                out.extend(f"{deeper}| {_text(member, source)}" for member in members[1:])
            out.append(f"{inner}],")
    out.append(pad + ")" + match["tail"])
    return out


def _union_members(node: ast.expr) -> list[ast.expr]:
    """`A | B | C` -> [A, B, C]; anything else -> [itself]."""
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.BitOr):
        return [*_union_members(node.left), node.right]
    return [node]


def _is_expression(text: str) -> bool:
    try:
        ast.parse(text, mode="eval")
    except SyntaxError:
        return False
    return True


def _text(node: ast.expr, source: str) -> str:
    segment = ast.get_source_segment(source, node)
    assert segment is not None
    return segment


_Parts = tuple[str, list[tuple[str, ast.expr]], str, bool]


def _parts(node: ast.expr, source: str) -> _Parts | None:
    """(text up to and with the opening bracket, (prefix, item) pairs, closing bracket,
    one-tuple) of what can be split; None for an atom."""
    if isinstance(node, ast.Call):
        items = [("", arg) for arg in node.args]
        items += [(f"{kw.arg}=", kw.value) for kw in node.keywords]
        return _text(node.func, source) + "(", items, ")", False
    if isinstance(node, ast.Tuple) and _text(node, source).startswith("("):
        return "(", [("", element) for element in node.elts], ")", len(node.elts) == 1
    if isinstance(node, ast.Set):
        return "{", [("", element) for element in node.elts], "}", False
    if isinstance(node, ast.Dict):
        keys = [key for key in node.keys if key is not None]  # None: a `**spread`
        if len(keys) == len(node.values):
            pairs = zip(keys, node.values, strict=True)
            return "{", [(_text(key, source) + ": ", value) for key, value in pairs], "}", False
    if isinstance(node, ast.Subscript):
        index = node.slice
        elements = index.elts if isinstance(index, ast.Tuple) else [index]
        return _text(node.value, source) + "[", [("", e) for e in elements], "]", False
    return None


def _format(
    indent: int, prefix: str, node: ast.expr, suffix: str, source: str, out: list[str]
) -> None:
    """ruff's right-hand split: the line as it is if it fits; else the outermost brackets
    open it, a call's arguments on one line if they fit (no trailing comma added), else one
    item per line with a trailing comma, each split the same way."""
    pad = " " * indent
    line = pad + prefix + _text(node, source) + suffix
    parts = _parts(node, source)
    if _width(line) <= LINE_LENGTH or parts is None or not parts[1]:
        out.append(line)
        return
    head, items, close, one_tuple = parts
    out.append(pad + prefix + head)
    inner = indent + 4
    body = ", ".join(p + _text(item, source) for p, item in items) + ("," if one_tuple else "")
    # A call's arguments stay on one line if they fit; a tuple or set literal of several
    # items is always exploded one per line (ruff, like black, explodes collection atoms).
    literal = isinstance(node, ast.Dict) or (
        isinstance(node, ast.Tuple | ast.Set) and len(items) > 1
    )
    if not literal and inner + _width(body) <= LINE_LENGTH:
        out.append(" " * inner + body)
    elif len(items) == 1 and not one_tuple:
        _format(inner, items[0][0], items[0][1], "", source, out)
    else:
        for p, item in items:
            _format(inner, p, item, ",", source, out)
    out.append(pad + close + suffix)
