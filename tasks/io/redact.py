"""Secrets out of logs, artifacts and manifests. Pure: no Prefect, Ray or torch.

`redact_text` masks, as "***": the current values of secret-looking environment variables, AWS access
key ids, Hugging Face tokens, bearer tokens, credentials in URLs, and the values of secret-looking keys
(`token=...`, `"password": "..."`). `redact` does the same through dicts, lists and tuples.
`install_log_filter` redacts every log record this process makes, including those Prefect ships to its API.
"""

from __future__ import annotations

import logging
import os
import re
from typing import Any

MASK = "***"
MIN_ENV_SECRET = 8  # shorter values ("1", "true") are flags, and masking them would garble every log

# Environment variables whose values are secrets; TOKEN only as a word, so TOKENIZERS_PARALLELISM is not.
_SECRET_ENV = re.compile(
    r"SECRET|PASSWORD|PASSWD|CREDENTIAL|API_KEY|ACCESS_KEY|PRIVATE_KEY|AUTH_STRING|(^|_)TOKEN(_|$)", re.I
)
_NOT_SECRET_ENV = re.compile(r"_(FILE|PATH|DIR)$", re.I)  # where a secret lives, not the secret

# Keys (in key=value text and in dicts) whose values are secrets.
_SECRET_KEY = re.compile(
    r"secret|passw(or)?d|credential|api[_-]?key|access[_-]?key|private[_-]?key|auth[_-]?string", re.I
)
_TOKEN_KEY = re.compile(r"(^|[_.-])token$", re.I)  # hf_token, AWS_SESSION_TOKEN; not max_new_tokens
_CAMEL_TOKEN_KEY = re.compile(r"[a-z]Token$")  # accessToken
# A tokenizer's special tokens are not credentials.
_SPECIAL_TOKENS = {"pad_token", "eos_token", "bos_token", "unk_token", "sep_token", "cls_token", "mask_token"}

_PATTERNS = [
    (re.compile(r"\b(?:AKIA|ASIA)[A-Z0-9]{16}\b"), MASK),  # AWS access key id
    (re.compile(r"\bhf_[A-Za-z0-9]{30,}\b"), MASK),  # Hugging Face token
    (re.compile(r"\b(Bearer\s+)[A-Za-z0-9._~+/=-]+", re.I), r"\1" + MASK),
    (re.compile(r"\b([A-Za-z][A-Za-z0-9+.-]*://)[^/\s@?#]+@"), r"\1" + MASK + "@"),  # scheme://user:pass@host
]
_QUOTED = r"""(?P<vq>["'])(?:\\.|(?!(?P=vq)).)*(?P=vq)"""  # a quoted string, escapes allowed
# "key": "value" and 'key': 'value' (JSON, Python reprs).
_QUOTED_PAIR = re.compile(r"""(?P<kq>["'])(?P<key>[\w.-]{1,80})(?P=kq)(?P<sep>\s*:\s*)""" + _QUOTED)
# key=value, key="value" (command lines, URLs' query strings, env dumps).
_ASSIGN_PAIR = re.compile(r"""(?P<key>[A-Za-z_][\w.-]{0,80})(?P<sep>\s*=\s*)(?:""" + _QUOTED + r"""|[^\s&,;"')\]}]+)""")


def is_secret_key(key: str) -> bool:
    """Whether a key (a dict key, an option, a variable name) names a secret."""
    if key.lower() in _SPECIAL_TOKENS:
        return False
    return bool(_SECRET_KEY.search(key) or _TOKEN_KEY.search(key) or _CAMEL_TOKEN_KEY.search(key))


def _env_secrets() -> list[str]:
    """Values of secret-looking environment variables, now (they may change while a process runs)."""
    values = {
        v for k, v in os.environ.items()
        if len(v) >= MIN_ENV_SECRET and _SECRET_ENV.search(k) and not _NOT_SECRET_ENV.search(k)
    }
    return sorted(values, key=len, reverse=True)  # longest first: a value may contain another


def _mask_quoted(m: re.Match) -> str:
    if not is_secret_key(m["key"]):
        return m[0]
    return f"{m['kq']}{m['key']}{m['kq']}{m['sep']}{m['vq']}{MASK}{m['vq']}"


def _mask_assign(m: re.Match) -> str:
    if not is_secret_key(m["key"]):
        return m[0]
    q = m["vq"] or ""
    return f"{m['key']}{m['sep']}{q}{MASK}{q}"


def redact_text(s: str) -> str:
    """`s` with every secret it shows replaced by "***"."""
    for value in _env_secrets():
        s = s.replace(value, MASK)
    for pattern, repl in _PATTERNS:
        s = pattern.sub(repl, s)
    s = _QUOTED_PAIR.sub(_mask_quoted, s)
    return _ASSIGN_PAIR.sub(_mask_assign, s)


def redact(obj: Any) -> Any:
    """A copy of `obj` (dicts, lists, tuples, strings; anything else as is) with secrets masked: the value
    of a secret-looking dict key is "***" whatever it was."""
    if isinstance(obj, str):
        return redact_text(obj)
    if isinstance(obj, dict):
        return {k: MASK if isinstance(k, str) and is_secret_key(k) else redact(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [redact(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(redact(v) for v in obj)
    return obj


def redact_record(record: logging.LogRecord) -> None:
    """Mask a record in place: its message formatted once and redacted, and its traceback text. A record
    of an error that is the user's (UserError, StorageError, too many generation errors: their class
    says `one_line`) loses its traceback: its message says it all, and a bug keeps its traceback."""
    if record.exc_info and getattr(type(record.exc_info[1]), "one_line", False):
        _one_line(record)
    if record.args is None and record.msg is getattr(record, "_redacted_msg", None):
        return  # already masked, and not rebuilt since (makeLogRecord updates a made record)
    try:
        message = record.getMessage()
    except Exception:  # bad format args: mask the parts and let the handler report the error as usual
        record.msg = redact(record.msg)
        record.args = redact(record.args)
    else:
        record.msg, record.args = redact_text(message), None
    if record.exc_info and not record.exc_text:
        record.exc_text = logging.Formatter().formatException(record.exc_info)
    if record.exc_text:
        record.exc_text = redact_text(record.exc_text)
    if record.stack_info:
        record.stack_info = redact_text(record.stack_info)
    record._redacted_msg = record.msg


_LOGGED: dict[int, BaseException] = {}  # user errors already logged as errors (the last few, held alive)


def _one_line(record: logging.LogRecord) -> None:
    """A user's error: no traceback, and an error line only the first time it is logged (a task, its flow
    and Prefect's engine each log the same exception as it goes up: one error line, the others info)."""
    exc = record.exc_info[1]
    record.exc_info = record.exc_text = None
    if record.levelno < logging.ERROR:
        return
    if id(exc) in _LOGGED and _LOGGED[id(exc)] is exc:
        record.levelno, record.levelname = logging.INFO, logging.getLevelName(logging.INFO)
        return
    if len(_LOGGED) >= 64:
        _LOGGED.pop(next(iter(_LOGGED)))
    _LOGGED[id(exc)] = exc


class RedactingFilter(logging.Filter):
    """Masks secrets in every record a handler passes on; never drops one."""

    def filter(self, record: logging.LogRecord) -> bool:
        redact_record(record)
        return True


_FILTER = RedactingFilter()
_LOGGERS = ("prefect", "ray", "tasks", "flows")


def _redacting_factory(base):
    def factory(*args, **kwargs):
        record = base(*args, **kwargs)
        redact_record(record)
        return record

    factory._redacts = True
    return factory


def install_log_filter() -> None:
    """Redact every log record of this process; safe to call again.

    Two layers. The record factory masks each record where it is made, so handlers added later (Prefect
    configures its own, including the APILogHandler that ships run logs to the server, on
    `prefect.flow_runs` and `prefect.task_runs`) see masked text too. The filter on every handler now on
    the root logger and on the prefect, ray, tasks and flows loggers (and their children) also masks
    records that were not made by this process's factory, such as those rebuilt from another process.
    """
    base = logging.getLogRecordFactory()
    if not getattr(base, "_redacts", False):
        logging.setLogRecordFactory(_redacting_factory(base))
    loggers = [logging.getLogger()]
    for name, logger in list(logging.Logger.manager.loggerDict.items()):
        if isinstance(logger, logging.Logger) and any(name == n or name.startswith(n + ".") for n in _LOGGERS):
            loggers.append(logger)
    loggers += [logging.getLogger(n) for n in _LOGGERS]
    for logger in loggers:
        for handler in logger.handlers:
            if _FILTER not in handler.filters:
                handler.addFilter(_FILTER)
