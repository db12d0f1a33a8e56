"""Which request field asks for a constrained reply: OpenAI's ``response_format``, vLLM's ``structured_outputs``
and its older ``guided_json`` / ``guided_regex`` / ``guided_choice`` / ``guided_grammar``."""

from __future__ import annotations

from joule.sampling_params import StructuredOutputsParams

_CONSTRAINT_FIELDS = ("response_format", "structured_outputs", "guided_json", "guided_regex", "guided_choice",
                      "guided_grammar")


def structured_outputs_of(request) -> tuple[StructuredOutputsParams | None, str | None]:
    """The output constraint and the field that asked for it; ValueError starting with that field's name."""
    asked = {name: getattr(request, name) for name in _CONSTRAINT_FIELDS if getattr(request, name) is not None}
    if request.response_format is not None and request.response_format.get("type", "text") == "text":
        asked.pop("response_format")
    if len(asked) > 1:
        first = next(iter(asked))
        raise ValueError(f"{first} cannot be combined with {', '.join(list(asked)[1:])}: set one of them")
    if not asked:
        return None, None
    (name, value), = asked.items()
    try:
        if name == "response_format":
            return _response_format_spec(value), name
        if name == "structured_outputs":
            if not isinstance(value, dict):
                raise ValueError("must be an object such as {\"json\": {...}}")
            known = StructuredOutputsParams.KINDS
            return StructuredOutputsParams(**{key: item for key, item in value.items() if key in known}), name
        return StructuredOutputsParams(**{name.removeprefix("guided_"): value}), name
    except (TypeError, ValueError) as error:
        message = str(error).removeprefix("structured_outputs ")
        raise ValueError(f"{name} {message}") from None


def _response_format_spec(response_format: dict) -> StructuredOutputsParams:
    kind = response_format.get("type")
    if kind == "json_object":
        return StructuredOutputsParams(json_object=True)
    if kind == "json_schema":
        described = response_format.get("json_schema")
        schema = described.get("schema") if isinstance(described, dict) else None
        if not isinstance(schema, dict):
            raise ValueError("of type json_schema needs json_schema.schema, a JSON schema object")
        return StructuredOutputsParams(json=schema)
    raise ValueError(f"type must be text, json_object or json_schema, got {kind!r}")
