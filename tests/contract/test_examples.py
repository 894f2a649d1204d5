"""The examples of openapi/openapi.json are valid against their own schemas.

Every request body and every response with a body carries an example (the Rust test
`tests/api/openapi.rs` fails when one is missing); here each example is validated with
`jsonschema` (JSON Schema 2020-12, the dialect of OpenAPI 3.1) against the schema next to it,
with `$ref`s resolved in the document, so an example cannot rot when a schema changes.
"""

from __future__ import annotations

import copy
import json

import pytest
from jsonschema import Draft202012Validator, FormatChecker
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

from conftest import SPEC_PATH

DOC_URI = "urn:postwire:openapi"


def load_spec() -> dict:
    return json.loads(SPEC_PATH.read_text())


def examples(spec: dict):
    """(where, schema, example) for every example of a request body or response."""
    for path, item in spec["paths"].items():
        for method, op in item.items():
            bodies = []
            if "requestBody" in op:
                bodies.append(("request", op["requestBody"]))
            bodies += [(code, r) for code, r in op["responses"].items()]
            for what, body in bodies:
                for media, content in body.get("content", {}).items():
                    where = f"{method} {path} {what} {media}"
                    values = []
                    if "example" in content:
                        values.append(("example", content["example"]))
                    for name, e in content.get("examples", {}).items():
                        values.append((f"examples.{name}", e["value"]))
                    for label, value in values:
                        yield f"{where} {label}", content.get("schema", {}), value


def validator_for(spec: dict, schema: dict) -> Draft202012Validator:
    # The schema is validated as a subschema of the whole document, so that
    # "#/components/schemas/..." references resolve against it.
    wrapped = {"$ref": DOC_URI + "#/$defs/__example_schema__"}
    doc = copy.deepcopy(spec)
    doc["$defs"] = {"__example_schema__": schema}
    registry = Registry().with_resource(DOC_URI, Resource(contents=doc, specification=DRAFT202012))
    return Draft202012Validator(wrapped, registry=registry, format_checker=FormatChecker())


def errors_of(spec: dict, schema: dict, value) -> list[str]:
    v = validator_for(spec, schema)
    return [f"{'/'.join(map(str, e.absolute_path)) or '(root)'}: {e.message}" for e in v.iter_errors(value)]


def test_every_example_matches_its_schema():
    spec = load_spec()
    found = list(examples(spec))
    assert len(found) > 100, f"only {len(found)} examples in the document"
    bad = []
    for where, schema, value in found:
        assert schema, f"{where}: an example without a schema"
        for e in errors_of(spec, schema, value):
            bad.append(f"{where}: {e}")
    assert not bad, "examples that do not match their schema:\n" + "\n".join(bad)
    print(f"{len(found)} examples validated")


@pytest.mark.parametrize(
    "mutate",
    [
        # a required field missing, a wrong enum value, an unknown field in a closed request
        lambda ex: ex.pop("tenant_id"),
        lambda ex: ex.__setitem__("status", "deleted"),
    ],
)
def test_a_rotten_example_is_caught(mutate):
    # The check really validates: a tenant example broken as a schema change would break it.
    spec = load_spec()
    content = spec["paths"]["/api/v1/tenants/{tenant_id}"]["get"]["responses"]["200"]["content"]["application/json"]
    example = copy.deepcopy(content["example"])
    assert not errors_of(spec, content["schema"], example)
    mutate(example)
    assert errors_of(spec, content["schema"], example), "a broken example passed validation"


def test_a_closed_request_refuses_an_unknown_field_in_its_example():
    spec = load_spec()
    content = spec["paths"]["/api/v1/tenants/{tenant_id}"]["put"]["requestBody"]["content"]["application/json"]
    example = dict(content["example"], nickname="acme")
    assert errors_of(spec, content["schema"], example)
