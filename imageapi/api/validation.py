"""Request validators that replace connexion's defaults, for clearer and safer 400s.

connexion 3.3's own validators (a) decode the body with the charset of the request and let a
`UnicodeDecodeError` escape as a 500, (b) report a parameter error as `str(ValidationError)`, a
multi-line dump of the whole schema, and (c) echo the offending value in the message, which
would put a cephx `secret` into the response and the log. These subclasses fix all three and
name the field in every message (`body.options.ro: 'yes' is not of type 'boolean'`).

jsonschema's Draft 4 format checker knows `ipv4` but not the OpenAPI formats `int32` and
`int64`, so an integer outside them (an id of 2**63) passed validation; `FORMAT_CHECKER` adds
them.
"""

from __future__ import annotations

import codecs
import json
from collections.abc import AsyncGenerator, Iterable
from typing import Any

from connexion.datastructures import MediaTypeDict
from connexion.exceptions import BadRequestProblem, UnsupportedMediaTypeProblem
from connexion.json_schema import Draft4RequestValidator
from connexion.validators import JSONRequestBodyValidator, ParameterValidator
from jsonschema import Draft4Validator, FormatChecker, ValidationError
from jsonschema.exceptions import best_match
from starlette.datastructures import Headers
from starlette.types import Receive, Scope

# Properties whose values must never appear in a message (write-only in the spec).
SECRET_FIELDS = frozenset({"secret"})
MISSING_BODY = "body: a JSON request body is required"
JSON_NULL = object()  # a body that is JSON's `null`, told apart from no body

INTEGER_FORMATS = {"int32": 32, "int64": 64}


def _integer_format(bits: int) -> Any:
    low, high = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1

    def check(value: object) -> bool:
        # A format constrains only values of its type; the type is checked on its own.
        if isinstance(value, bool) or not isinstance(value, int):
            return True
        return low <= value <= high

    return check


# Draft 4's formats plus the OpenAPI integer formats, for every request validator below.
FORMAT_CHECKER = FormatChecker(formats=())
FORMAT_CHECKER.checkers = dict(Draft4Validator.FORMAT_CHECKER.checkers)
for _name, _bits in INTEGER_FORMATS.items():
    FORMAT_CHECKER.checks(_name)(_integer_format(_bits))


def field_path(root: str, path: Iterable[Any]) -> str:
    """`body`, `body.options`, `body.lower[0].overlay` — the way a client would name the field."""
    text = root
    for part in path:
        text += f"[{part}]" if isinstance(part, int) else f".{part}"
    return text


def describe(error: ValidationError, root: str) -> str:
    """One line naming the field and the problem, without the value of a secret."""
    where = field_path(root, error.absolute_path)
    if SECRET_FIELDS.intersection(str(p) for p in error.absolute_path):
        # The default message starts with the value itself; say only which rule failed.
        return f"{where}: invalid value (fails '{error.validator}')"
    if error.validator == "pattern" and isinstance(error.instance, str):
        control = next((i for i, c in enumerate(error.instance)
                        if ord(c) < 0x20 or ord(c) == 0x7f), None)
        if control is not None:
            return (f"{where}: control character {error.instance[control]!r} at offset "
                    f"{control} (the pattern {error.validator_value} refuses it)")
        shown = error.instance if len(error.instance) <= 80 else error.instance[:80] + "..."
        return f"{where}: {shown!r} does not match {error.validator_value!r}"
    if error.validator in ("maxLength", "minLength") and isinstance(error.instance, str):
        # Said without the value: a 140 KB command must not come back in the message.
        limit = "at most" if error.validator == "maxLength" else "at least"
        return (f"{where}: {len(error.instance)} characters long; {limit} "
                f"{error.validator_value} are allowed")
    return f"{where}: {error.message}"


def first_error(validator: Draft4Validator, instance: Any) -> ValidationError | None:
    # best_match prefers the error closest to the cause over the first one found.
    return best_match(validator.iter_errors(instance))


class JsonBodyValidator(JSONRequestBodyValidator):
    """JSON body validation: UTF-8 only, bad bytes and bad JSON are 400s, messages name fields."""

    async def wrap_receive(self, receive: Receive, *, scope: Scope) -> tuple[Receive, Scope]:
        # Same test as connexion's, with a message in the style of the others.
        if self._required and not int(Headers(scope=scope).get("content-length", 0) or 0):
            raise BadRequestProblem(detail=MISSING_BODY)
        return await super().wrap_receive(receive, scope=scope)

    async def _parse(self, stream: AsyncGenerator[bytes, None], scope: Scope) -> Any:
        raw = b"".join([chunk async for chunk in stream])
        if not raw:
            return None
        # JSON on the wire is UTF-8 (RFC 8259); the handlers' parser assumes it too, so a
        # body in another charset would pass here and then reach the handler as None.
        try:
            charset = codecs.lookup(self._encoding).name
        except LookupError:
            charset = self._encoding
        if charset != "utf-8":
            raise UnsupportedMediaTypeProblem(
                detail=f"unsupported charset {self._encoding!r}: request bodies must be UTF-8 JSON"
            )
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise BadRequestProblem(
                detail=f"body: not valid UTF-8 (byte {exc.start}: {exc.reason})"
            ) from None
        try:
            body = json.loads(text, parse_constant=_reject_constant)
            # An explicit `null` is a body, and not an object; only an absent one may be left out.
            return JSON_NULL if body is None else body
        except json.JSONDecodeError as exc:
            raise BadRequestProblem(detail=f"body: not valid JSON: {exc}") from None
        except ValueError as exc:
            raise BadRequestProblem(detail=f"body: not valid JSON: {exc}") from None
        except RecursionError:
            raise BadRequestProblem(detail="body: JSON nested too deeply") from None

    def _validate(self, body: Any) -> None:
        if body is None:
            if self._required:
                raise BadRequestProblem(detail=MISSING_BODY)
            return  # an optional body left out (DELETE /mount?id=N)
        if body is JSON_NULL:
            body = None
        validator = Draft4RequestValidator(self._schema, format_checker=FORMAT_CHECKER)
        error = first_error(validator, body)
        if error is not None:
            # Logged once, by the error handler, with the request line.
            raise BadRequestProblem(detail=describe(error, "body"))


def _reject_constant(name: str) -> Any:
    # Python's json accepts NaN and Infinity; JSON does not, and no field of ours takes them.
    raise ValueError(f"{name} is not a JSON value")


class PathParameterValidator(ParameterValidator):
    """Parameter validation with one-line messages instead of a dump of the schema."""

    @staticmethod
    def validate_parameter(
        parameter_type: str, value: Any, param: dict[str, Any], param_name: str | None = None
    ) -> str | None:
        if value is None:
            if param.get("required"):
                return f"{parameter_type} parameter '{param['name']}': missing"
            return None
        schema = param.get("schema", param)
        validator = Draft4Validator(schema, format_checker=FORMAT_CHECKER)
        error = first_error(validator, value)
        if error is None:
            return None
        return f"{parameter_type} parameter '{param['name']}': {error.message}"


def validator_map() -> dict[str, Any]:
    """The `validator_map` for connexion: only JSON bodies are consumed by this API."""
    return {
        "parameter": PathParameterValidator,
        "body": MediaTypeDict({"*/*json": JsonBodyValidator}),
    }
