"""Feedback credentials: the token list's format and which token name a request presents."""

from __future__ import annotations

from pathlib import Path

import pytest

from app.monitoring.feedback import FeedbackCredentials, parse_feedback_tokens
from app.retrain.alerts import UnauthorizedError
from app.settings import Settings


def test_a_single_plain_token_is_named_default() -> None:
    assert parse_feedback_tokens("  s3cr3t-token \n") == {"default": "s3cr3t-token"}


def test_several_named_tokens_parse_by_line_or_comma_skipping_comments() -> None:
    text = "# clients\nweb:tok-web\n\nmobile: tok-mobile \npartner.eu:tok:with:colons,batch-1:tok-batch\n"
    assert parse_feedback_tokens(text) == {
        "web": "tok-web",
        "mobile": "tok-mobile",
        "partner.eu": "tok:with:colons",
        "batch-1": "tok-batch",
    }


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("web:SECRET1\nweb:SECRET2", "given twice"),
        ("SECRET1\nSECRET2", "given twice"),  # two unnamed tokens would both be "default"
        ("web:SECRET1\nmobile:SECRET1", "same as another"),
        ("web:", "empty"),
        ("anonymous:SECRET1", "name must be"),
        ("legacy:SECRET1", "name must be"),
        ("a b:SECRET1", "name must be"),
        (f"{'n' * 65}:SECRET1", "name must be"),
    ],
)
def test_a_malformed_token_list_is_refused_without_quoting_a_token(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message) as raised:
        parse_feedback_tokens(text)
    assert "SECRET" not in str(raised.value)


def test_identify_names_the_presented_token_and_refuses_the_rest() -> None:
    credentials = FeedbackCredentials((("web", "tok-web"), ("mobile", "tok-mobile")))
    assert credentials.identify("Bearer tok-web") == "web"
    assert credentials.identify("bearer  tok-mobile ") == "mobile"
    for header in ("", "Bearer", "Bearer tok", "Bearer tok-web2", "Basic tok-web", "tok-web", "Bearer web"):
        with pytest.raises(UnauthorizedError):
            credentials.identify(header)


def test_no_token_refuses_everything_unless_development_mode_allows_it_as_anonymous() -> None:
    with pytest.raises(UnauthorizedError, match="no feedback token"):
        FeedbackCredentials().identify("Bearer anything")
    assert FeedbackCredentials(allow_unauthenticated=True).identify("") == "anonymous"
    configured = FeedbackCredentials((("default", "tok"),), allow_unauthenticated=True)
    with pytest.raises(UnauthorizedError):
        configured.identify("")


def test_tokens_come_from_the_file_setting(tmp_path: Path) -> None:
    path = tmp_path / "feedback_token"
    path.write_text("web:tok-web\nmobile:tok-mobile\n")
    credentials = FeedbackCredentials.from_settings(Settings(feedback_token_file=path))
    assert credentials.tokens == (("web", "tok-web"), ("mobile", "tok-mobile"))
    path.write_text("web:a\nweb:b\n")
    with pytest.raises(ValueError, match=r"SENTIMENT_FEEDBACK_TOKEN\(_FILE\).*given twice"):
        FeedbackCredentials.from_settings(Settings(feedback_token_file=path))
