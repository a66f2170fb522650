"""Wire types: msgspec Structs, with their decoders and encoders built once."""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec

from service.settings import MAX_SCORE

MAX_USER_ID_LENGTH = 128

UserId = Annotated[
    str,
    msgspec.Meta(
        min_length=1,
        max_length=MAX_USER_ID_LENGTH,
        # printable: no control characters, which would corrupt logs and keys' readability
        pattern=r"^[^\x00-\x1f\x7f]+$",
        description="The user's unique identifier (1-128 printable characters).",
    ),
]


class ScoreUpdate(msgspec.Struct, forbid_unknown_fields=True):
    """Body of POST /api/v1/score."""

    user_id: UserId
    # The configured SCORE_MAX_INCREASE is checked after decoding; this bound keeps
    # arbitrarily large JSON integers out of the program.
    score_increase: Annotated[int, msgspec.Meta(ge=1, le=MAX_SCORE)]


class ScoreUpdated(msgspec.Struct):
    """200 reply of POST /api/v1/score (the spec's body, plus the rank when it is known)."""

    message: str
    user_id: str
    new_score: int
    rank: int | msgspec.UnsetType = msgspec.UNSET


class Entry(msgspec.Struct):
    """One row of a leaderboard: equal scores share a rank and are listed by user_id."""

    rank: int
    user_id: str
    score: int


class Leaderboard(msgspec.Struct, tag_field="type", tag="leaderboard"):
    """The top-N with its version: the REST body and the live frame share this shape."""

    version: str
    top: list[Entry]


class UserScore(msgspec.Struct):
    """200 reply of GET /api/v1/users/{user_id}."""

    user_id: str
    score: int
    rank: int


class UsersRequest(msgspec.Struct, forbid_unknown_fields=True):
    """Body of POST /api/v1/admin/users."""

    user_ids: Annotated[list[UserId], msgspec.Meta(min_length=1, max_length=10_000)]


class UsersProvisioned(msgspec.Struct):
    """200 reply of POST /api/v1/admin/users: new users, and those that already existed."""

    created: int
    existing: int


class Adjustment(msgspec.Struct, forbid_unknown_fields=True):
    """One item of POST /api/v1/admin/scores: `delta` may be negative, never zero."""

    user_id: UserId
    delta: Annotated[
        int, msgspec.Meta(ge=-MAX_SCORE, le=MAX_SCORE, extra_json_schema={"not": {"const": 0}})
    ]
    # the pattern is checked after decoding (service.admin), with its own message
    idempotency_key: Annotated[
        str,
        msgspec.Meta(
            min_length=1, max_length=200, extra_json_schema={"pattern": "^[\\x21-\\x7e]{1,200}$"}
        ),
    ]


class AdjustmentsRequest(msgspec.Struct, forbid_unknown_fields=True):
    """Body of POST /api/v1/admin/scores."""

    adjustments: Annotated[list[Adjustment], msgspec.Meta(min_length=1, max_length=1000)]


class AdjustmentResult(msgspec.Struct):
    """One item's outcome; `new_score` for `applied` and `replayed` only."""

    user_id: str
    idempotency_key: str
    status: Literal["applied", "replayed", "unknown_user", "out_of_range", "conflict"]
    new_score: int | None = None


class AdjustmentsApplied(msgspec.Struct):
    """200 reply of POST /api/v1/admin/scores: one result per item, in order."""

    results: list[AdjustmentResult]


class Problem(msgspec.Struct, omit_defaults=True):
    """RFC 9457 problem details."""

    title: str
    status: int
    detail: str
    type: str = "about:blank"
    instance: str | None = None


encoder = msgspec.json.Encoder()
score_update_decoder = msgspec.json.Decoder(ScoreUpdate)
users_request_decoder = msgspec.json.Decoder(UsersRequest)
adjustments_decoder = msgspec.json.Decoder(AdjustmentsRequest)
