"""Structured output: a json_schema sampling option decodes under llama.cpp's grammar sampler, so every
reply parses and matches its schema, for one branch and for several decoding together."""

from __future__ import annotations

import json

import jsonschema
import pytest

from kvfork.engine.sampling import SamplingParams
from kvfork.errors import InvalidParameter
from tests.support.text import long_text

REPORT = {
    "type": "object",
    "properties": {
        "severity": {"enum": ["low", "medium", "high"]},
        "valves": {"type": "array", "items": {"type": "integer"}, "minItems": 1, "maxItems": 3},
        "resolved": {"type": "boolean"},
        "owner": {"type": "object", "properties": {"team": {"enum": ["day", "night"]}}, "required": ["team"]},
    },
    "required": ["severity", "valves", "resolved", "owner"],
}
FLAG = {"type": "object", "properties": {"flag": {"type": "boolean"}}, "required": ["flag"]}


def test_a_branch_constrained_by_a_schema_replies_with_valid_json(gemma):
    prompt = gemma.prompt_tokens(long_text(10), "Describe the incident as JSON.")
    free = gemma.generate(prompt, max_tokens=48)
    out = gemma.generate(prompt, max_tokens=96, json_schema=REPORT)
    assert out.finish_reason == "stop", out.text
    jsonschema.validate(json.loads(out.text), REPORT)
    # NOTE: the baseline: unconstrained, the same prompt does not give this JSON
    with pytest.raises((ValueError, jsonschema.ValidationError)):
        jsonschema.validate(json.loads(free.text), REPORT)


def test_branches_with_different_schemas_decode_together(gemma):
    note = {"type": "object", "properties": {"note": {"type": "string", "maxLength": 24}}, "required": ["note"]}
    schemas = [REPORT, FLAG, note]
    with gemma.prefill(long_text(10)) as snapshot:
        outs = snapshot.fan_out(["Report as JSON.", "Is it resolved? JSON.", "A short note as JSON."],
                                params=[SamplingParams(max_tokens=96, json_schema=s) for s in schemas])
    for out, schema in zip(outs, schemas, strict=True):
        assert out.finish_reason == "stop", out.text
        value = json.loads(out.text)
        jsonschema.validate(value, schema)
        assert isinstance(value, dict)


def test_schemas_it_cannot_enforce_are_refused_before_anything_runs(gemma):
    with pytest.raises(InvalidParameter, match="json_schema"):
        gemma.sampling(json_schema={"type": "frob"})
    with pytest.raises(InvalidParameter, match="JSON"):
        SamplingParams(json_schema="{not json")
    with pytest.raises(InvalidParameter, match="object"):
        SamplingParams(json_schema="[1, 2]")


def test_a_pattern_with_escaped_regex_characters_is_enforced(gemma):
    # NOTE: llama-cpp-python's converter turned the escaped dot into a GBNF literal llama.cpp could not parse
    email = {"type": "object", "properties": {"email": {"type": "string", "pattern": "^[a-z]+@[a-z]+\\.(com|org)$"}},
             "required": ["email"]}
    out = gemma.generate(gemma.prompt_tokens("Contacts: ana at example dot org.", "Her email as JSON."),
                         max_tokens=48, json_schema=email)
    assert out.finish_reason == "stop", out.text
    jsonschema.validate(json.loads(out.text), email)
