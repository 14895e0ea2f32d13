"""Property tests: whatever bytes a user or an attacker puts in an item file or a bundle
manifest, quantbuild answers with its own one-line error (or accepts a valid value), never
with another exception."""

import json
import shutil

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from quantbuild.errors import DataError
from quantbuild.tasks.items import load_items

GOOD_ITEM = {"id": "a", "family": "reasoning", "prompt": "p", "expected": "1", "scorer": "exact"}
SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=12),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)


def _one_line(message: str) -> bool:
    return bool(message) and "\n" not in message


@SETTINGS
@given(record=st.dictionaries(st.sampled_from([*GOOD_ITEM, "schema", "meta", "other"]), json_values, max_size=8))
def test_any_json_object_is_an_item_or_one_data_error(tmp_path, record):
    path = tmp_path / "items.jsonl"
    path.write_text(json.dumps({**GOOD_ITEM, **record}) + "\n", encoding="utf-8")
    try:
        items = load_items(path)
    except DataError as err:
        assert _one_line(str(err)) and str(path) in str(err)
    else:
        assert len(items) == 1 and items[0].id


@SETTINGS
@given(data=st.binary(max_size=200))
def test_any_bytes_are_items_or_one_data_error(tmp_path, data):
    path = tmp_path / "items.jsonl"
    path.write_bytes(data)
    try:
        load_items(path)
    except DataError as err:
        assert _one_line(str(err))


@SETTINGS
@given(mutation=st.one_of(
    st.tuples(st.just("replace"), json_values),
    st.tuples(st.just("field"), st.sampled_from(["files", "schema", "signing", "fingerprints", "variant", "model"]),
              json_values),
    st.tuples(st.just("entry"), json_values),
    st.tuples(st.just("truncate"), st.integers(min_value=0, max_value=400)),
))
def test_any_manifest_edit_is_ok_or_one_line_problems(tmp_path_factory, mutation):
    from test_verify import make_bundle

    from quantbuild.release.manifest import MANIFEST
    from quantbuild.release.verify import verify

    root = tmp_path_factory.mktemp("fuzz")
    bundle = make_bundle(root)
    path = bundle / MANIFEST
    manifest = json.loads(path.read_text())
    kind = mutation[0]
    if kind == "replace":
        path.write_text(json.dumps(mutation[1]))
    elif kind == "field":
        manifest[mutation[1]] = mutation[2]
        path.write_text(json.dumps(manifest))
    elif kind == "entry":
        manifest["files"]["config.json"] = mutation[1]
        path.write_text(json.dumps(manifest))
    else:
        path.write_text(path.read_text()[: mutation[1]])
    result = verify(bundle)
    assert result.exit_code in (0, 1, 2)
    assert all(_one_line(problem) for problem in result.problems)
    shutil.rmtree(root)
