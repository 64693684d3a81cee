"""The filter language and its compilation to fixed-shape stack programs.

Grammar (EBNF; keywords case-insensitive; NOT binds tighter than AND, AND tighter than OR):

    expr    = and_expr { ("OR" | "|") and_expr } ;
    and_expr= not_expr { ("AND" | "&") not_expr } ;
    not_expr= ("NOT" | "!") not_expr | atom ;
    atom    = "(" expr ")" | term ;
    term    = feature ":" ( value [ ":" weight ] | "{" value { "," value } "}" ) ;
    feature = integer | name ;   value = integer | name | '"' text '"' ;
    integer = [ "-" ] digit { digit } ;   weight = integer [ "." digit { digit } ] ;
    name    = word of ASCII letters, digits, "_", ".", "-" ;   digit = "0" | ... | "9" ;

`cat:{music,sports}` means `cat:music OR cat:sports`. Numeric terms (`3:17`, `-2` values
allowed) are the official SilverTorch syntax; a trailing `:weight` (a number) is accepted and
ignored, anything else after a second ':' is an error: a value containing ':' or non-ASCII
characters is quoted (`start:"12:30"`, `genre:"Comédie"`).
Named features need a `FilterSchema` mapping names to feature ids; non-integer values are
hashed with FNV-1a 64 of their NFC form (`hashing.string_value`, which item encoding shares); ASCII digits, quoted or not, are the number (`word_value`,
which `FilterSchema.encode_items` applies to string attributes alike). An empty expression
matches everything.

A batch compiles to `FilterPlans`: per query a postfix program of at most `max_ops` ops
(TERM, EXACT_TERM, AND, OR, NOT, TRUE; NOP pads), term hashes, and a bounded stack depth.
Terms under an odd number of NOTs compile to EXACT_TERM: the index evaluates them exactly
(from its side table), so NOT never flips a Bloom false positive into a lost true match.
A query's EXACT_TERM terms take its first term slots (0, 1, ...; the other terms follow), so an
evaluator can compute exact bits for a fixed few leading slots instead of every slot.
"""

from __future__ import annotations

import dataclasses
import numbers
import re
import warnings
from collections.abc import Mapping

import torch

from .hashing import string_value, term_hash

NOP, TERM, EXACT_TERM, AND, OR, NOT, TRUE = 0, 1, 2, 3, 4, 5, 6
MAX_DEPTH = 8  # the kernels keep this many stack slots in registers
MAX_NESTING = 64  # parentheses and NOTs inside each other; checked while parsing (the parser recurses)
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
# ASCII digits only: re's \d and int() take every Unicode decimal digit ("１９９５" would be 1995)
_INTEGER = re.compile(r"-?[0-9]+")
_WEIGHT = re.compile(r"-?[0-9]+(\.[0-9]+)?")


class FilterSyntaxError(ValueError):
    def __init__(self, expression: str, position: int, expected: str, found: str):
        self.position = position
        pointer = expression + "\n" + " " * position + "^"
        super().__init__(f"filter syntax error at position {position}: expected {expected}, found {found}\n{pointer}")


def word_value(text: str) -> int:
    """The int64 value of an attribute or filter value written as text: ASCII digits (an optional
    minus, in the int64 range) are the number, so "1995" and 1995 are the same value, quoted or
    not, in the items and in the filters (leading zeros do not count: "02139" is 2139); any other
    text, other scripts' digits included ("１９９５"), is hashed (FNV-1a 64)."""
    if _INTEGER.fullmatch(text) and INT64_MIN <= int(text) <= INT64_MAX:
        return int(text)
    return string_value(text)


# an unquoted word of the filter language (a token, and so any feature name a filter can write)
_WORD = r"[A-Za-z0-9_.\-]+"
_NAME = re.compile(_WORD)


@dataclasses.dataclass(frozen=True)
class FilterSchema:
    """Names for feature ids: FilterSchema({"lang": 1, "cat": 2}).

    Each name must be writable in a filter: ASCII letters, digits, '_', '.' and '-', not AND, OR
    or NOT, and not a number (the parser reads `2024:x` as feature id 2024) unless it names its
    own id; each id an int64 integer used by one name. Ids are stored as Python ints."""

    features: dict

    def __post_init__(self):
        object.__setattr__(self, "features", _checked_features(self.features))  # numpy ids as Python ints: the artifact's JSON takes them

    @classmethod
    def _saved(cls, features, source: str) -> FilterSchema:
        """The schema of a saved artifact. One saved before names and ids were checked may hold a
        name no filter can write or two names on one id: it is kept as saved, so the artifact
        loads and answers as it did, and a warning names what filters cannot reach or mix up."""
        problems: list[str] = []
        checked = _checked_features(features, problems)
        if problems:
            warnings.warn(f"{source}: kept as saved (as earlier versions wrote it, so the artifact answers as before), a "
                          f"filter schema FilterSchema now refuses: {'; '.join(problems)}", UserWarning, stacklevel=4)  # at the caller of load
        schema = object.__new__(cls)
        object.__setattr__(schema, "features", checked)
        return schema

    def feature_id(self, name: str, expression: str, position: int) -> int:
        if name not in self.features:
            raise FilterSyntaxError(expression, position, f"a known feature ({', '.join(sorted(self.features))})", repr(name))
        return self.features[name]

    def encode_items(self, items) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per-item attributes, e.g. [{"genre": ["Comedy", "Drama"], "year": 1995}, ...] -> the jagged
        (feature_ids, offsets, values) that BloomIndex.build and publish take. Integers stay
        integers (`year:1995`); strings take the filter language's value of the same word or
        quoted text (`word_value`: `genre:Comedy`, `title:"Toy Story"`; digits are the number,
        so a "1995" string matches `year:1995`). Values may be Python or numpy ints and strings,
        one or several (a list, tuple, set, numpy array or tensor)."""
        fids, vals, offsets = [], [], [0]
        for i, item in enumerate(items):
            if not isinstance(item, Mapping):
                raise ValueError(f"item {i} must be a mapping of attribute name -> value(s), got {type(item).__name__}")
            for name, values in item.items():
                if name not in self.features:
                    raise ValueError(f"item {i}: unknown attribute {name!r}; the schema has {sorted(self.features)}")
                if isinstance(values, (list, tuple, set, frozenset)):
                    values = list(values)
                elif getattr(values, "ndim", 0) >= 1:  # a numpy array or tensor of values
                    values = values.tolist()
                else:
                    values = [values]
                for v in values:
                    if isinstance(v, bool) or not isinstance(v, (numbers.Integral, str)):  # numpy ints too (pandas rows)
                        raise ValueError(f"item {i}: attribute {name!r} values must be int or str, got {type(v).__name__}")
                    if isinstance(v, numbers.Integral) and not INT64_MIN <= int(v) <= INT64_MAX:
                        raise ValueError(f"item {i}: attribute {name!r} value {int(v)} is outside the int64 range; pass it "
                                         f"as a string (text, which a quoted filter value matches)")
                    fids.append(self.features[name])
                    vals.append(int(v) if isinstance(v, numbers.Integral) else word_value(v))
            offsets.append(len(vals))
        return (torch.tensor(fids, dtype=torch.int64), torch.tensor(offsets, dtype=torch.int64),
                torch.tensor(vals, dtype=torch.int64))


def _checked_features(features, problems: list[str] | None = None) -> dict:
    """FilterSchema's checks; with `problems` (a list), a name filters cannot write or an id two
    names share is recorded there and kept instead of refused (saved artifacts)."""
    if not isinstance(features, dict):
        raise ValueError(f"a filter schema maps feature names to ids (a dict), got {type(features).__name__}")

    def refuse(message: str) -> None:
        if problems is None:
            raise ValueError(message)
        problems.append(message)

    checked, owner = {}, {}
    for name, fid in features.items():
        writable = isinstance(name, str) and _NAME.fullmatch(name) and name.upper() not in ("AND", "OR", "NOT")
        if not writable:
            refuse(f"schema feature name {name!r} cannot be written in a filter: use ASCII letters, digits, "
                   f"'_', '.' and '-' (not AND, OR or NOT)")
        if isinstance(fid, bool) or not isinstance(fid, numbers.Integral) or not INT64_MIN <= int(fid) <= INT64_MAX:
            raise ValueError(f"schema feature {name!r}: the id must be an int64 integer, got {fid!r}")
        if writable and _INTEGER.fullmatch(name) and int(name) != int(fid):
            refuse(f"schema feature name {name!r} is a number: a filter {name}:value reads feature id "
                   f"{int(name)}, not {int(fid)}; name it with a letter, or give it id {int(name)}")
        if int(fid) in owner:
            refuse(f"schema features {owner[int(fid)]!r} and {name!r} share feature id {int(fid)}: a filter "
                   f"on one would match the other's values")
        owner.setdefault(int(fid), name)
        checked[name] = int(fid)
    return checked


@dataclasses.dataclass
class FilterPlans:
    """Fixed-shape compiled filters for a batch of queries."""

    ops: torch.Tensor  # int32 [Q, L]
    args: torch.Tensor  # int32 [Q, L]: term slot for TERM / EXACT_TERM (EXACT_TERM slots first)
    hashes: torch.Tensor  # int64 [Q, T]
    expressions: list

    @property
    def num_queries(self) -> int:
        return self.ops.shape[0]

    def exact_terms_per_query(self) -> torch.Tensor:
        """int64 [Q]: how many terms each query evaluates exactly (its leading term slots)."""
        return (self.ops == EXACT_TERM).sum(1)

    def to(self, device) -> FilterPlans:
        return FilterPlans(self.ops.to(device), self.args.to(device), self.hashes.to(device), self.expressions)

    def select(self, queries: torch.Tensor) -> FilterPlans:
        """The plans of the given queries (row indices), in that order."""
        rows = queries.to(self.ops.device)
        return FilterPlans(self.ops[rows], self.args[rows], self.hashes[rows], [self.expressions[i] for i in queries.tolist()])


_TOKEN = re.compile(r'\s*(?:(?P<lp>\()|(?P<rp>\))|(?P<lb>\{)|(?P<rb>\})|(?P<comma>,)|(?P<colon>:)|(?P<and>&)|(?P<or>\|)|(?P<not>!)'
                    r'|(?P<str>"[^"]*")|(?P<word>-?' + _WORD + '))')


def _tokenize(text: str):
    pos, out = 0, []
    while pos < len(text):
        if text[pos:].strip() == "":
            break
        m = _TOKEN.match(text, pos)
        if not m or m.end() == pos:
            start = pos + (len(text[pos:]) - len(text[pos:].lstrip()))
            if text[start] == '"':
                raise FilterSyntaxError(text, start, "a closing '\"' (this quoted value is unterminated)", "end of expression")
            if not text[start].isascii():  # unquoted words are ASCII: Comédie, "１９９５" need quotes
                raise FilterSyntaxError(text, start, "a term, operator or parenthesis (unquoted words are ASCII letters, digits, "
                                        "'_', '.' and '-'; quote other text: \"...\")", repr(text[start]))
            raise FilterSyntaxError(text, start, "a term, operator or parenthesis", repr(text[start]))
        kind = m.lastgroup
        start = m.start(kind)
        value = m.group(kind)
        if kind == "word" and value.upper() in ("AND", "OR", "NOT"):
            kind = value.lower()
        out.append((kind, value, start))
        pos = m.end()
    out.append(("end", "", len(text)))
    return out


class _Parser:
    def __init__(self, text, schema, max_terms):
        self.text, self.schema, self.max_terms = text, schema, max_terms
        self.tokens = _tokenize(text)
        self.i = 0
        self.n_terms = 0
        self.nesting = 0

    def peek(self):
        return self.tokens[self.i]

    def take(self, kind, expected):
        tok = self.peek()
        if tok[0] != kind:
            self.fail(expected)
        self.i += 1
        return tok

    def fail(self, expected):
        kind, value, pos = self.peek()
        raise FilterSyntaxError(self.text, pos, expected, "end of expression" if kind == "end" else repr(value))

    def parse(self):
        if self.peek()[0] == "end":
            return ("true",)
        node = self.expr()
        if self.peek()[0] != "end":
            self.fail("AND, OR or the end of the expression")
        return node

    def expr(self):
        node = self.and_expr()
        while self.peek()[0] == "or":
            self.i += 1
            node = ("or", node, self.and_expr())
        return node

    def and_expr(self):
        node = self.not_expr()
        while self.peek()[0] == "and":
            self.i += 1
            node = ("and", node, self.not_expr())
        return node

    def nest(self):
        self.nesting += 1
        if self.nesting > MAX_NESTING:
            self.fail(f"at most {MAX_NESTING} parentheses and NOTs inside each other")

    def not_expr(self):
        if self.peek()[0] in ("not",):
            self.nest()
            self.i += 1
            node = ("not", self.not_expr())
            self.nesting -= 1
            return node
        return self.atom()

    def atom(self):
        kind = self.peek()[0]
        if kind == "lp":
            self.nest()
            self.i += 1
            node = self.expr()
            self.take("rp", "')'")
            self.nesting -= 1
            return node
        if kind == "word":
            return self.term()
        self.fail("a term like feature:value, NOT or '('")

    def _value(self):
        kind, value, pos = self.peek()
        if kind == "str":
            self.i += 1
            return word_value(value[1:-1])
        if kind != "word":
            self.fail("a value")
        value = self._int(value) if _INTEGER.fullmatch(value) else string_value(value)
        self.i += 1
        return value

    def _int(self, word):
        """The number at the current token as an int64, or an error pointing at it (the hash
        takes int64 ids and values)."""
        number = int(word)
        if not INT64_MIN <= number <= INT64_MAX:
            self.fail("a number in the int64 range")
        return number

    def _leaf(self, fid, value):
        self.n_terms += 1
        if self.n_terms > self.max_terms:
            raise ValueError(f"filter {self.text!r} has more than max_terms={self.max_terms} terms")
        return ("term", fid, value)

    def term(self):
        kind, name, pos = self.peek()
        fid = self._int(name) if kind == "word" and _INTEGER.fullmatch(name) else None
        self.take("word", "a feature")
        if fid is None:
            if self.schema is None:
                raise FilterSyntaxError(self.text, pos, "a numeric feature id (named features need a FilterSchema)", repr(name))
            fid = self.schema.feature_id(name, self.text, pos)
        self.take("colon", "':' after the feature")
        if self.peek()[0] == "lb":
            self.i += 1
            node = self._leaf(fid, self._value())
            while self.peek()[0] == "comma":
                self.i += 1
                node = ("or", node, self._leaf(fid, self._value()))
            self.take("rb", "',' or '}'")
            return node
        node = self._leaf(fid, self._value())
        if self.peek()[0] == "colon":  # official syntax: optional numeric weight, ignored
            self.i += 1
            kind, weight, _ = self.peek()
            if kind != "word" or not _WEIGHT.fullmatch(weight):  # not a value swallowed: start:12:abc, genre:a:b
                self.fail("a numeric weight after the value's ':' (quote a value that contains ':', e.g. start:\"12:30\")")
            self.i += 1
        return node


def _compile(node, program, terms, negated, depth):
    """Postfix emission; returns the stack depth this subtree needs."""
    kind = node[0]
    if kind == "true":
        program.append((TRUE, 0))
        return depth + 1
    if kind == "term":
        terms.append((node[1], node[2]))
        program.append((EXACT_TERM if negated else TERM, len(terms) - 1))
        return depth + 1
    if kind == "not":
        need = _compile(node[1], program, terms, not negated, depth)
        program.append((NOT, 0))
        return need
    left = _compile(node[1], program, terms, negated, depth)
    right = _compile(node[2], program, terms, negated, depth + 1)
    program.append((AND if kind == "and" else OR, 0))
    return max(left, right)


def parse_filters(expressions, schema: FilterSchema | dict | None = None, max_terms: int = 32,
                  max_length: int = 4096) -> FilterPlans:
    """Compile a batch of filter expressions (one per query) into fixed-shape plans."""
    if isinstance(expressions, str):
        raise TypeError("parse_filters takes a list of expressions (one per query), not a string")
    expressions = list(expressions)  # a generator is read once: kept for the plans' expressions too
    if isinstance(schema, dict):
        schema = FilterSchema(schema)
    programs, all_terms = [], []
    for text in expressions:
        if not isinstance(text, str):
            raise TypeError(f"each filter must be a string, got {type(text).__name__}")
        if len(text) > max_length:
            raise ValueError(f"filter expression is {len(text)} characters long; the limit is max_length={max_length}")
        tree = _Parser(text, schema, max_terms).parse()
        program, terms = [], []
        depth = _compile(tree, program, terms, False, 0)
        if depth > MAX_DEPTH:
            raise ValueError(f"filter {text!r} nests too deeply: needs a stack of {depth}, the limit is {MAX_DEPTH}")
        # renumber the term slots: exact terms first, each group in program order
        order = sorted((op != EXACT_TERM, arg) for op, arg in program if op in (TERM, EXACT_TERM))
        slot = {arg: new for new, (_, arg) in enumerate(order)}
        programs.append([(op, slot[arg] if op in (TERM, EXACT_TERM) else arg) for op, arg in program])
        all_terms.append([terms[arg] for _, arg in order])
    length = max([len(p) for p in programs] + [1])
    n_terms = max([len(t) for t in all_terms] + [1])
    # padded rows built as lists and the batch's terms hashed in one call: an element-wise fill and
    # a hash per expression cost more than the parse itself
    ops = torch.tensor([[op for op, _ in p] + [0] * (length - len(p)) for p in programs], dtype=torch.int32).view(-1, length)
    args = torch.tensor([[arg for _, arg in p] + [0] * (length - len(p)) for p in programs], dtype=torch.int32).view(-1, length)
    fids = torch.tensor([[f for f, _ in t] + [0] * (n_terms - len(t)) for t in all_terms], dtype=torch.int64).view(-1, n_terms)
    vals = torch.tensor([[v for _, v in t] + [0] * (n_terms - len(t)) for t in all_terms], dtype=torch.int64).view(-1, n_terms)
    used = torch.tensor([[True] * len(t) + [False] * (n_terms - len(t)) for t in all_terms], dtype=torch.bool).view(-1, n_terms)
    hashes = torch.where(used, term_hash(fids, vals), 0)  # unused slots hold 0, as before
    return FilterPlans(ops, args, hashes, expressions)
