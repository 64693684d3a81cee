import math

import pytest
import torch

from silvertorch import FilterSyntaxError, parse_filters
from silvertorch.bloom.hashing import bloom_positions, string_value, term_hash
from silvertorch.bloom.parser import AND, EXACT_TERM, NOT, OR, TERM, TRUE

SCHEMA = {"lang": 1, "cat": 2, "creator": 3}


def test_precedence_and_polarity():
    p = parse_filters(["lang:en AND (cat:music OR cat:sports) AND NOT creator:123"], schema=SCHEMA)
    assert p.ops[0].tolist() == [TERM, TERM, TERM, OR, AND, EXACT_TERM, NOT, AND]
    q = parse_filters(["1:1 | 2:2 & !3:3"])  # NOT > AND > OR
    assert q.ops[0].tolist() == [TERM, TERM, EXACT_TERM, NOT, AND, OR]
    assert parse_filters(["NOT NOT 1:1"]).ops[0].tolist() == [TERM, NOT, NOT]


def test_exact_terms_take_the_leading_slots():
    """A query's terms under NOT get slots 0, 1, ... (evaluators compute exact bits for a few leading
    slots only); every op still names its own term's hash."""
    text = "1:1 AND NOT 2:2 AND (3:3 OR NOT (4:4 | !5:5)) AND NOT 6:6"
    p = parse_filters([text, "7:7"])
    terms = {TERM: [(1, 1), (3, 3), (5, 5)], EXACT_TERM: [(2, 2), (4, 4), (6, 6)]}  # each kind in program order
    seen = {TERM: [], EXACT_TERM: []}
    for op, slot in zip(p.ops[0].tolist(), p.args[0].tolist()):
        if op in seen:
            seen[op].append(slot)
    assert seen == {EXACT_TERM: [0, 1, 2], TERM: [3, 4, 5]}
    for op, slots in seen.items():
        fids, vals = torch.tensor(terms[op]).T
        assert torch.equal(p.hashes[0, slots], term_hash(fids, vals))
    assert p.exact_terms_per_query().tolist() == [3, 0]


def test_set_sugar_weights_strings_and_empty():
    a = parse_filters(["cat:{music,sports}"], schema=SCHEMA)
    b = parse_filters(["cat:music OR cat:sports"], schema=SCHEMA)
    assert torch.equal(a.ops, b.ops) and torch.equal(a.hashes, b.hashes)
    assert torch.equal(parse_filters(["3:-17:0.5"]).hashes, parse_filters(["3:-17"]).hashes)
    assert torch.equal(parse_filters(['2:"rock music"']).hashes[0, 0], term_hash(torch.tensor(2), torch.tensor(string_value("rock music"))))
    assert parse_filters([""]).ops[0].tolist() == [TRUE]


@pytest.mark.parametrize(
    "text, position, expected",
    [("1:", 2, "a value"), ("(1:2", 4, "')'"), ("1:2 AND", 7, "a term"), ("AND 1:2", 0, "a term"),
     ("1:2 2:3", 4, "AND, OR"), ("1:2 @", 4, "a term, operator"), ("1:{2,", 5, "a value"), ("lang:en", 0, "numeric feature id"),
     # nesting is limited while parsing (no RecursionError); numbers must fit the int64 hash
     ("!" * 1000 + "1:1", 64, "at most 64 parentheses and NOTs"), ("(" * 300 + "1:1" + ")" * 300, 64, "at most 64"),
     ("1:99999999999999999999", 2, "int64 range"), ("99999999999999999999:1", 0, "int64 range"),
     ("1:{2,-9223372036854775809}", 5, "int64 range")],
)
def test_errors_name_position_and_expectation(text, position, expected):
    with pytest.raises(FilterSyntaxError) as err:
        parse_filters([text])
    assert err.value.position == position and expected in str(err.value)


def test_limits_and_types():
    assert parse_filters([" OR ".join(f"1:{i}" for i in range(32))]).hashes.shape == (1, 32)  # max_terms, exactly
    with pytest.raises(ValueError, match="more than max_terms=32 terms"):
        parse_filters([" OR ".join(f"1:{i}" for i in range(33))])
    with pytest.raises(ValueError, match="max_length"):
        parse_filters(["1:1" + " " * 5000])
    with pytest.raises(ValueError, match="nests too deeply"):
        nested = "1:0"
        for i in range(9):
            nested = f"1:{i} AND ({nested})"  # right-deep: each level keeps one more operand on the stack
        parse_filters([nested])
    assert parse_filters(["!" * 64 + "1:1", "(" * 64 + "1:-9223372036854775808" + ")" * 64]).ops.shape == (2, 65)
    with pytest.raises(TypeError, match="list"):
        parse_filters("1:1")
    with pytest.raises(FilterSyntaxError, match="known feature"):
        parse_filters(["genre:x"], schema=SCHEMA)


def test_positions_are_distinct_in_range_and_independent():
    """k distinct rows in [0, width), a uniformly random k-subset: every row in about k/width of the
    terms' sets, and nearly as many different sets as draws. Double hashing's (h1 + j * h2) rows
    were fixed by two residues: at most width * (width - 1) / 2 sets (the test fails for it)."""
    n, width, k = 40_000, 31, 5
    h = term_hash(torch.ones(n, dtype=torch.long), torch.arange(n))
    pos = bloom_positions(h, torch.full((n,), width), k)
    assert pos.shape == (n, k) and ((pos >= 0) & (pos < width)).all()
    assert all(len(set(row)) == k for row in pos.tolist())
    counts = torch.bincount(pos.reshape(-1), minlength=width).float()  # within ~5 sigma of n * k / width
    assert (counts - n * k / width).abs().max() < 5 * math.sqrt(n * k / width), counts
    # C(31, 5) = 169,911 sets: 40,000 uniform draws give ~35,700 different ones
    assert len({tuple(sorted(row)) for row in pos.tolist()}) > 34_000


def test_hashes_are_splitmix64_in_uint64_arithmetic():
    """Stored Bloom bits depend on these exact values (a saved index is queried by later processes):
    term_hash and the rows match the documented formulas in Python's exact uint64
    arithmetic, for terms whose hashes cover the top bit (the int64 emulation's logical shifts)."""
    mask, golden = (1 << 64) - 1, 0x9E3779B97F4A7C15

    def mix(x):
        x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & mask
        x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & mask
        return x ^ (x >> 31)

    def signed(x):
        return x - (1 << 64) if x >> 63 else x

    fids = [0, 1, 2, 3, 17, 2**31, 2**62 + 5, -1]
    vals = [0, -1, 1995, string_value("rock music"), -(2**63), 2**63 - 1, 12345, 7]
    got = term_hash(torch.tensor(fids), torch.tensor(vals), seed=3).tolist()
    want = [mix(mix((f * golden + 3) & mask) ^ (v & mask)) for f, v in zip(fids, vals, strict=True)]
    assert got == [signed(h) for h in want] and any(h >> 63 for h in want)
    width, k = 37, 5  # prime, as a bundle's; small, so that Floyd's replacements happen
    hashes = got + term_hash(torch.ones(400, dtype=torch.long), torch.arange(400)).tolist()
    rows = bloom_positions(torch.tensor(hashes), torch.full((len(hashes),), width), k).tolist()
    want_rows, replaced = [], 0
    for h in hashes:
        h &= mask
        draws = [half for i in (1, 2, 3) for r in [mix((h + i * golden) & mask)] for half in (r & 0xFFFFFFFF, r >> 32)]
        picked = []
        for j in range(k):
            top, row = width - k + j, draws[j] % (width - k + j + 1)
            replaced += row in picked
            picked.append(top if row in picked else row)
        want_rows.append(picked)
    assert rows == want_rows and replaced > 10


def test_schema_encodes_item_attributes_as_the_language_hashes_them():
    from silvertorch import BloomIndex, FilterSchema

    schema = FilterSchema({"genre": 1, "year": 2, "title": 3})
    items = [{"genre": ["Comedy", "Drama"], "year": 1995}, {"genre": "Horror", "year": []}, {"title": "Toy Story", "year": 1995}]
    fids, offsets, values = schema.encode_items(items)
    assert offsets.tolist() == [0, 3, 4, 6] and fids.tolist() == [1, 1, 2, 1, 3, 2]
    index = BloomIndex.build(fids, offsets, values, k=3, b_multiplier=5.0)
    plans = parse_filters(['genre:Comedy', 'year:1995 AND NOT genre:Drama', 'title:"Toy Story"', "genre:Horror"], schema=schema)
    exact = index.verify(plans, torch.arange(3).unsqueeze(0).expand(4, 3))
    assert exact.tolist() == [[True, False, False], [False, False, True], [False, False, True], [False, True, False]]
    # digits are the number, in a string attribute and in a filter, quoted or not (CSV and JSON
    # data often hold zip codes and years as strings)
    digits = FilterSchema({"zip": 4, "year": 2}).encode_items([{"zip": "02139", "year": "1995"}, {"zip": "90210", "year": 1996}])
    index = BloomIndex.build(*digits, k=3, b_multiplier=5.0)
    exprs = ["zip:02139", 'zip:"02139"', "year:1995", 'year:"1996"', "NOT zip:02139", 'zip:"-7"']
    exact = index.verify(parse_filters(exprs, schema=FilterSchema({"zip": 4, "year": 2})), torch.arange(2).expand(6, 2))
    assert exact.tolist() == [[True, False], [True, False], [True, False], [False, True], [False, True], [False, False]]
    with pytest.raises(ValueError, match="unknown attribute 'rating'"):
        schema.encode_items([{"rating": 5}])
    with pytest.raises(ValueError, match="must be int or str"):
        schema.encode_items([{"year": 1995.0}])


def test_schema_encodes_numpy_values_and_refuses_ints_past_int64():
    """Rows from pandas (`df.to_dict("records")`) hold numpy ints and arrays (they were refused);
    an int past int64 is refused naming the item and attribute (it was an unexplained overflow)."""
    import numpy as np

    from silvertorch import BloomIndex, FilterSchema

    schema = FilterSchema({"genre": 1, "year": 2, "big": 3})
    items = [{"genre": np.array(["Comedy", "Drama"]), "year": np.int64(1995)}, {"genre": "Horror", "year": np.int32(1996)},
             {"big": "18446744073709551616", "year": torch.tensor([1995, 1997])}]
    fids, offsets, values = schema.encode_items(items)
    assert offsets.tolist() == [0, 3, 5, 8] and fids.tolist() == [1, 1, 2, 1, 2, 3, 2, 2]
    assert values[2] == 1995 and values[4] == 1996
    index = BloomIndex.build(fids, offsets, values, k=3, b_multiplier=5.0)
    exprs = ["year:1995", "genre:Drama", 'big:"18446744073709551616"', 'big:"18446744073709551617"', "year:1997 AND NOT genre:Horror"]
    exact = index.verify(parse_filters(exprs, schema=schema), torch.arange(3).expand(len(exprs), 3))
    assert exact.tolist() == [[True, False, True], [True, False, False], [False, False, True], [False, False, False],
                              [False, False, True]]
    with pytest.raises(ValueError, match="item 1: attribute 'big' value 18446744073709551616 is outside the int64 range"):
        schema.encode_items([{"year": 1}, {"big": 2**64}])
    with pytest.raises(ValueError, match="'year' values must be int or str, got bool"):
        schema.encode_items([{"year": np.bool_(True)}])


@pytest.mark.parametrize("text, position", [("start:12:abc", 9), ("genre:Comedy:Drama", 13), ("start:12:", 9), ("3:4:1.", 4)])
def test_a_weight_is_a_number_or_an_error_that_says_to_quote(text, position):
    """The optional `:weight` is a number; another word there was silently dropped (a value with ':'
    in it, or a typo, became another filter)."""
    with pytest.raises(FilterSyntaxError) as err:
        parse_filters([text], schema={"start": 1, "genre": 2})
    assert err.value.position == position and "numeric weight" in str(err.value) and 'start:"12:30"' in str(err.value)


def test_numeric_weights_are_accepted_and_ignored():
    plain = parse_filters(["3:17"]).hashes
    for text in ("3:17:2", "3:17:-2", "3:17:0.25", "3:17:-0.5"):
        assert torch.equal(parse_filters([text]).hashes, plain), text
    quoted = parse_filters(['1:"12:30"']).hashes[0, 0]
    assert torch.equal(quoted, term_hash(torch.tensor(1), torch.tensor(string_value("12:30"))))


def test_only_ascii_digits_make_a_number():
    from silvertorch import FilterSchema
    from silvertorch.bloom.parser import word_value

    assert word_value("1995") == 1995 and word_value("-7") == -7
    for text in ("１９９５", "١٩٩٥", "১৯৯৫", "-１"):
        assert word_value(text) == string_value(text), text
    fids, offsets, values = FilterSchema({"title": 1}).encode_items([{"title": "１９９５"}, {"title": "1995"}])
    assert values.tolist() == [string_value("１９９５"), 1995]
    assert not torch.equal(parse_filters(['1:"１９９５"']).hashes, parse_filters(["1:1995"]).hashes)


def test_nfc_and_nfd_spellings_of_a_value_match_each_other():
    # "Comédie" with a precomposed é (NFC) and with e + a combining accent (NFD) are the same
    # text; their UTF-8 bytes differ, and the filter silently matched nothing across the two
    import unicodedata

    from silvertorch import BloomIndex, FilterSchema

    nfc, nfd = unicodedata.normalize("NFC", "Comédie"), unicodedata.normalize("NFD", "Comédie")
    assert nfc != nfd
    schema = FilterSchema({"genre": 1})
    items = [{"genre": nfc}, {"genre": nfd}, {"genre": "Drame"}]
    index = BloomIndex.build(*schema.encode_items(items), k=3, b_multiplier=5.0)
    plans = parse_filters([f'genre:"{nfd}"', f'genre:"{nfc}"', f'NOT genre:"{nfd}"'], schema=schema)
    exact = index.verify(plans, torch.arange(3).unsqueeze(0).expand(3, 3))
    assert exact.tolist() == [[True, True, False], [True, True, False], [False, False, True]]
    # ASCII and NFC text hash as before (saved artifacts keep matching): the FNV-1a 64 of the bytes
    for text in ("Comedy", nfc, "１９９５"):
        h = 0xCBF29CE484222325
        for byte in text.encode("utf-8"):
            h = ((h ^ byte) * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
        assert string_value(text) == (h - (1 << 64) if h >= 1 << 63 else h)
    assert string_value(nfd) == string_value(nfc)


@pytest.mark.parametrize("text, position, expected", [
    ('genre:"Comedy', 6, "unterminated"), ('genre:{"a","b}', 11, "unterminated"),
    ("genre:Comédie", 9, 'quote other text: "..."'), ("genre:１９９５", 6, 'quote other text')])
def test_unterminated_quotes_and_non_ascii_words_say_so(text, position, expected):
    with pytest.raises(FilterSyntaxError) as err:
        parse_filters([text], schema={"genre": 1})
    assert err.value.position == position and expected in str(err.value)


@pytest.mark.parametrize("schema, match", [
    # a number: encode_items gave its items id 5, the filter 2024:x read feature id 2024 and matched nothing
    ({"2024": 5}, r"'2024' is a number: a filter 2024:value reads feature id 2024, not 5"),
    ({"género": 1}, "cannot be written in a filter"),  # unquoted words are ASCII; feature names cannot be quoted
    ({"my genre": 1}, "cannot be written in a filter"),
    ({"Not": 1}, r"cannot be written in a filter: .*not AND, OR or NOT"),
    ({"": 1}, "cannot be written in a filter"),
    ({1: 1}, "cannot be written in a filter"),
    ({"genre": 1.5}, "the id must be an int64 integer, got 1.5"),  # was truncated to 1
    ({"genre": "1"}, "the id must be an int64 integer"),
    ({"genre": True}, "the id must be an int64 integer"),
    ({"genre": 2**70}, "the id must be an int64 integer"),  # was an overflow inside the hash
    ({"genre": 1, "style": 1}, "'genre' and 'style' share feature id 1"),  # genre:x matched items whose style is x
])
def test_schema_names_a_filter_can_write_and_integer_ids(schema, match):
    from silvertorch import FilterSchema

    with pytest.raises(ValueError, match=match):
        FilterSchema(schema)
    with pytest.raises(ValueError, match=match):
        parse_filters([""], schema=schema)


def test_schema_ids_from_numpy_are_python_ints_and_numeric_names_may_name_their_own_id():
    import json

    import numpy as np

    from silvertorch import FilterSchema

    schema = FilterSchema({"genre": np.int64(1), "7": 7, "user.age-band": np.int32(2)})
    assert json.dumps(schema.features) == '{"genre": 1, "7": 7, "user.age-band": 2}'  # numpy ids failed the artifact's JSON
    a, b = parse_filters(["7:x AND user.age-band:3"], schema=schema), parse_filters(["7:x AND 2:3"])
    assert torch.equal(a.hashes, b.hashes)
    with pytest.raises(ValueError, match="item 0 must be a mapping of attribute name -> value"):
        schema.encode_items(["genre"])  # was AttributeError: 'str' object has no attribute 'items'


def test_a_batch_compiles_each_expression_as_it_compiles_alone():
    """The batch's rows (hashed in one call, padded with zeros) are each expression's own plan."""
    texts = ["", "1:2", "a:{x,y} AND NOT (3:-4 OR b:\"q r\")", "NOT 5:9223372036854775807", "7:1 | 7:2 & !8:3"]
    batch = parse_filters(texts, schema={"a": 11, "b": 12})
    for i, text in enumerate(texts):
        alone = parse_filters([text], schema={"a": 11, "b": 12})
        for name in ("ops", "args", "hashes"):
            row, own = getattr(batch, name)[i], getattr(alone, name)[0]
            assert torch.equal(row[:own.numel()], own) and not row[own.numel():].any(), (text, name)


def test_a_generator_of_expressions_keeps_its_expressions():
    """A generator was read by the parse, and the plans kept an empty list of expressions (found by review)."""
    plans = parse_filters(f"1:{i}" for i in range(3))
    assert plans.expressions == ["1:0", "1:1", "1:2"] and plans.ops.shape[0] == 3
