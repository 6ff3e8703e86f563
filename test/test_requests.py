"""engine/requests.py: a request's generation settings checked at the edge, each error saying what
the field's special values mean as the interface (srv/Ask) says it."""
import math
import re

import pytest

from mobilevlm_ros.core.errors import RequestError
from mobilevlm_ros.engine.config import EngineConfig
from mobilevlm_ros.engine.requests import Request, generation_params

from helpers import REPO


def _interface_comments():
    """{field: its comment} of srv/Ask.srv's request (the comment lines just above each field)."""
    comments, lines = {}, []
    for line in (REPO / "srv" / "Ask.srv").read_text().split("\n---")[0].splitlines():
        if line.startswith("#"):
            lines.append(line.lstrip("# "))
        elif line.strip():
            comments[line.split()[1]] = " ".join(lines)
            lines = []
    return comments


MEANINGS = {"temperature": "negative = node default", "top_p": "negative = node default",
            "max_frame_age_ms": "0 = node default, negative = any cached frame"}


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("field", MEANINGS)
def test_a_non_finite_setting_is_refused_saying_what_the_interface_says(field, value):
    meaning = MEANINGS[field]
    with pytest.raises(RequestError) as e:
        generation_params(Request("q", **{field: value}), EngineConfig())
    assert str(e.value) == f"{field} must be a finite number ({meaning}), got {value}"
    # the meanings quoted are those of srv/Ask's comment on the field
    said = _interface_comments()[field].replace("the node's default", "node default")
    for part in meaning.split(", "):
        special, what = part.split(" = ")
        assert re.search(rf"(?:^|[ ;.]){special} = {what}", said, re.I), (part, said)
