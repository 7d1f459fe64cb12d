"""Name patterns users write (``filename``, ``folder``, ``latest_filename``): their variables, rendering, parsing.

:class:`NameFormat` is the only code that fills in or recovers the variables of such a pattern;
:mod:`lightning_ckpt.layout` re-exports everything here with the fixed names on storage.

Variables available in format strings (``filename``, ``folder``, ``latest_filename``):

======================  =========================================  =========================  ============
Variable                Value                                      Example pattern            Renders as
======================  =========================================  =========================  ============
``{run_name}``          the run's name                             ``{run_name}-ep{epoch}``   ``bert-ep3``
``{rank}``              global rank                                ``rank{rank}``             ``rank5``
``{local_rank}``        rank within the node                       ``local{local_rank}``      ``local1``
``{node_rank}``         rank of the node                           ``node{node_rank}``        ``node2``
``{world_size}``        number of processes                        ``ws{world_size}``         ``ws16``
``{local_world_size}``  processes per node                         ``lws{local_world_size}``  ``lws8``
``{epoch}``             ``trainer.current_epoch`` (0-based)        ``ep{epoch}``              ``ep3``
``{batch}``             ``trainer.global_step`` (optimizer steps)  ``ba{batch:06d}``          ``ba001200``
``{batch_in_epoch}``    batch index inside the epoch               ``b{batch_in_epoch}``      ``b17``
``{<metric>}``          any logged metric, by its full name        ``loss={val/loss:.3f}``    ``loss=0.125``
======================  =========================================  =========================  ============

Format specs (``:05d``, ``:.3f``) work as in :func:`format`. ``{{`` and ``}}`` are literal
braces. A field name is the whole text before ``:``, so metric names may contain ``/`` and
``.``; there is no attribute or index access and no ``!r`` conversion.

Example:
    >>> NameFormat(DEFAULT_FILENAME, argument="filename").render(progress=Progress(epoch=1, batch=40))
    'ep1-ba40'
"""

from __future__ import annotations

import difflib
import math
import re
import string
from collections.abc import Mapping
from dataclasses import dataclass, field

from lightning_ckpt.errors import ConfigError

__all__ = [
    "DEFAULT_FILENAME",
    "DEFAULT_LATEST_FILENAME",
    "DIST_VARIABLES",
    "PROGRESS_VARIABLES",
    "NameFormat",
    "Progress",
    "RankInfo",
    "dist_values",
]

DEFAULT_LATEST_FILENAME = "latest"
DEFAULT_FILENAME = "ep{epoch}-ba{batch}"

DIST_VARIABLES: frozenset[str] = frozenset(
    {"run_name", "rank", "local_rank", "node_rank", "world_size", "local_world_size"}
)
PROGRESS_VARIABLES: frozenset[str] = frozenset({"epoch", "batch", "batch_in_epoch"})
_INT_VARIABLES = (DIST_VARIABLES | PROGRESS_VARIABLES) - {"run_name"}

_INT_RE = r" *[-+]? *[0-9][0-9,_]*"
_FLOAT_RE = r" *[-+]?(?:[0-9][0-9,_]*(?:\.[0-9]*)?(?:[eE][-+]?[0-9]+)?%?|\.[0-9]+|inf|nan)"


@dataclass(frozen=True)
class RankInfo:
    """Where this process sits in the job.

    Example:
        >>> RankInfo(rank=3, world_size=4).local_rank
        0
    """

    rank: int = 0
    local_rank: int = 0
    node_rank: int = 0
    world_size: int = 1
    local_world_size: int = 1


@dataclass(frozen=True)
class Progress:
    """How far training got: the values of the progress and metric variables.

    Example:
        >>> Progress(epoch=2, batch=300, metrics={"val_loss": 0.5}).metrics["val_loss"]
        0.5
    """

    epoch: int = 0
    batch: int = 0
    batch_in_epoch: int = 0
    metrics: Mapping[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class _Field:
    name: str
    spec: str


def _escape(text: str) -> str:
    return text.replace("{", "{{").replace("}", "}}")


class NameFormat:
    """A validated name pattern such as ``"ep{epoch}-ba{batch}"`` that renders and parses names.

    Args:
        pattern: the format string (see the module docstring for the variables).
        argument: the public argument it came from, named in every error.
        allow_progress: whether progress and metric variables may appear (a folder may not hold them).
        allow_metrics: whether unknown names are accepted as metric names.

    Example:
        >>> fmt = NameFormat("step={batch}-loss={val_loss:.3f}", argument="filename")
        >>> fmt.render(progress=Progress(batch=7, metrics={"val_loss": 0.12345}))
        'step=7-loss=0.123'
        >>> fmt.parse("step=7-loss=0.123")
        {'batch': 7, 'val_loss': 0.123}
    """

    def __init__(self, pattern: str, *, argument: str, allow_progress: bool = True, allow_metrics: bool = True) -> None:
        self._argument = argument
        self._allow_progress = allow_progress
        self._allow_metrics = allow_metrics
        if not isinstance(pattern, str) or not pattern:
            raise ConfigError(argument, pattern, repr(DEFAULT_FILENAME), "It must be a non-empty string")
        self._pattern = pattern
        self._pieces = self._split(pattern)
        fields = [piece for piece in self._pieces if isinstance(piece, _Field)]
        for item in fields:
            self._check_field(item)
        self._placeholders = frozenset(item.name for item in fields)
        self._regex = re.compile("".join(self._regex_piece(piece, i) for i, piece in enumerate(self._pieces)))

    def _fail(self, reason: str, example: str = "") -> ConfigError:
        default = repr(DEFAULT_FILENAME) if self._allow_progress else self._example_without_progress()
        return ConfigError(self._argument, self._pattern, example or default, reason)

    def _example_without_progress(self) -> str:
        """A valid value for an argument without progress variables: a folder path, or a plain pointer name."""
        return "'{run_name}/checkpoints'" if self._argument == "folder" else f"{DEFAULT_LATEST_FILENAME!r}"

    def _split(self, pattern: str) -> list[str | _Field]:
        try:
            parsed = list(string.Formatter().parse(pattern))
        except ValueError as err:
            raise self._fail(f"Its braces are malformed ({err}); write '{{{{' or '}}}}' for a literal brace") from None
        pieces: list[str | _Field] = []
        for literal, name, spec, conversion in parsed:
            if literal:
                pieces.append(literal)
            if name is None:
                continue
            if conversion is not None:
                raise self._fail(f"Conversions like '{{{name}!{conversion}}}' are not supported")
            if not name or name.isdigit() or name != name.strip():
                raise self._fail(f"'{{{name}}}' is not a variable name; write e.g. '{{epoch}}'")
            if "{" in (spec or ""):
                raise self._fail(f"Nested fields in the format spec of '{{{name}}}' are not supported")
            pieces.append(_Field(name, spec or ""))
        return pieces

    def _check_field(self, item: _Field) -> None:
        known = DIST_VARIABLES | PROGRESS_VARIABLES if self._allow_progress else DIST_VARIABLES
        is_metric = item.name not in DIST_VARIABLES | PROGRESS_VARIABLES
        if is_metric and not self._allow_metrics:
            names = ", ".join("{" + n + "}" for n in sorted(known))
            raise self._fail(f"'{{{item.name}}}' is not a known variable; the known variables are {names}")
        if is_metric:  # a metric is only known at the first save: catch what is surely a misspelt variable now
            close = difflib.get_close_matches(item.name, sorted(known), n=1, cutoff=0.8)
            if close:
                raise self._fail(
                    f"'{{{item.name}}}' looks like a misspelling of the variable '{{{close[0]}}}' (it would be"
                    " taken for a metric, and fail only at the first save)",
                    repr(self._pattern.replace("{" + item.name, "{" + close[0])),
                )
        if item.name not in DIST_VARIABLES and not self._allow_progress:
            allowed = ", ".join("{" + n + "}" for n in sorted(DIST_VARIABLES))
            reason = f"It may not contain '{{{item.name}}}'; only {allowed} are allowed here"
            raise self._fail(reason)
        sample: object = "run" if item.name == "run_name" else 1 if item.name in _INT_VARIABLES else 0.5
        try:
            format(sample, item.spec)
        except ValueError as err:
            raise self._fail(f"The format spec ':{item.spec}' of '{{{item.name}}}' is invalid ({err})") from None

    def _regex_piece(self, piece: str | _Field, index: int) -> str:
        if isinstance(piece, str):
            return re.escape(piece)
        body = ".+?" if piece.name == "run_name" else _INT_RE if piece.name in _INT_VARIABLES else _FLOAT_RE
        return f"(?P<g{index}>{body})"

    @property
    def pattern(self) -> str:
        """The format string as given."""
        return self._pattern

    @property
    def placeholders(self) -> frozenset[str]:
        """Names of all variables in the pattern."""
        return self._placeholders

    @property
    def metric_names(self) -> frozenset[str]:
        """Names of the metric variables in the pattern (placeholders that are not built-in variables)."""
        return self._placeholders - DIST_VARIABLES - PROGRESS_VARIABLES

    def _values(self, run_name: str, rank: RankInfo, progress: Progress | None) -> dict[str, object]:
        values = dist_values(run_name, rank)
        needs_progress = self._placeholders - DIST_VARIABLES
        if needs_progress and progress is None:
            raise self._fail(f"{sorted(needs_progress)} need training progress, which is not known here")
        if progress is not None:
            values.update(epoch=progress.epoch, batch=progress.batch, batch_in_epoch=progress.batch_in_epoch)
            values.update(dict.fromkeys(self.missing_metrics(progress), math.nan))  # rendered as 'nan'
            values.update(progress.metrics)
        return values

    def missing_metrics(self, progress: Progress) -> list[str]:
        """The metric variables of the pattern that ``progress`` lacks (not logged): :meth:`render` writes ``nan``.

        Example:
            >>> NameFormat("ep{epoch}-{val_loss:.2f}", argument="filename").missing_metrics(Progress(epoch=1))
            ['val_loss']
        """
        return sorted(self.metric_names - set(progress.metrics))

    def render(self, *, run_name: str = "", rank: RankInfo = RankInfo(), progress: Progress | None = None) -> str:
        """Fill in the pattern.

        Args:
            run_name: value of ``{run_name}``.
            rank: values of the rank variables.
            progress: values of the progress and metric variables; needed when the pattern uses them.

        Returns:
            The rendered name.

        Raises:
            ConfigError: progress is needed but missing. A metric that is not logged renders as ``nan``
                (see :meth:`missing_metrics`): a name never costs the run or the checkpoint.

        Example:
            >>> fmt = NameFormat("{run_name}/rank{rank}", argument="folder")
            >>> fmt.render(run_name="a", rank=RankInfo(rank=2))
            'a/rank2'
        """
        values = self._values(run_name, rank, progress)
        out = [p if isinstance(p, str) else format(values[p.name], p.spec) for p in self._pieces]
        return "".join(out)

    def parse(self, name: str) -> dict[str, int | float | str] | None:
        """Recover the placeholder values from a rendered name: the inverse of :meth:`render`.

        Integers are understood in decimal formats (``:d``, ``:05d``, ``:6d``, ``:+d``, ``:,d``).

        Args:
            name: a name that may have been rendered from this pattern.

        Returns:
            ``{variable: value}`` (``int`` for the built-in integers, ``float`` for metrics, ``str``
            for ``run_name``), or ``None`` when ``name`` does not match the pattern.

        Example:
            >>> NameFormat("ep{epoch}-ba{batch}", argument="filename").parse("ep2-ba300")
            {'epoch': 2, 'batch': 300}
            >>> NameFormat("ep{epoch}-ba{batch}", argument="filename").parse("latest") is None
            True
        """
        match = self._regex.fullmatch(name)
        if match is None:
            return None
        result: dict[str, int | float | str] = {}
        for index, piece in enumerate(self._pieces):
            if isinstance(piece, str):
                continue
            value = _convert(piece, match.group(f"g{index}"))
            previous = result.setdefault(piece.name, value) if value is not None else None
            if previous is None or (previous is not value and previous != value):
                return None
        return result

    def partial(self, *, run_name: str, rank: RankInfo) -> NameFormat:
        """Fill in the run and rank variables only, keeping the progress and metric ones.

        Example:
            >>> NameFormat("{run_name}-r{rank}-ep{epoch}", argument="filename").partial(
            ...     run_name="bert", rank=RankInfo(rank=1)).pattern
            'bert-r1-ep{epoch}'
        """
        values = dist_values(run_name, rank)
        parts: list[str] = []
        for piece in self._pieces:
            if isinstance(piece, str):
                parts.append(_escape(piece))
            elif piece.name in DIST_VARIABLES:
                parts.append(_escape(format(values[piece.name], piece.spec)))
            else:
                parts.append("{" + piece.name + (":" + piece.spec if piece.spec else "") + "}")
        if not "".join(parts):
            raise self._fail(f"It renders to an empty name with run_name={run_name!r}")
        return NameFormat(
            "".join(parts),
            argument=self._argument,
            allow_progress=self._allow_progress,
            allow_metrics=self._allow_metrics,
        )

    def __repr__(self) -> str:
        return f"NameFormat({self._pattern!r}, argument={self._argument!r})"


def dist_values(run_name: str, rank: RankInfo) -> dict[str, object]:
    """The values of the dist variables for one rank.

    Example:
        >>> dist_values("r", RankInfo(rank=3, world_size=4))["rank"]
        3
    """
    return {
        "run_name": run_name,
        "rank": rank.rank,
        "local_rank": rank.local_rank,
        "node_rank": rank.node_rank,
        "world_size": rank.world_size,
        "local_world_size": rank.local_world_size,
    }


def _convert(piece: _Field, text: str) -> int | float | str | None:
    if piece.name == "run_name":
        return text
    if piece.name in _INT_VARIABLES:
        value = int(text.replace(" ", "").replace(",", "").replace("_", ""))
        return value if format(value, piece.spec) == text else None
    cleaned = text.strip().replace(",", "").replace("_", "")
    if cleaned.endswith("%"):
        return float(cleaned[:-1]) / 100
    return float(cleaned)
