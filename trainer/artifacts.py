"""Build the artifacts and metadata of a new version from a learned candidate.

``Exporter.export`` runs the publish gate's checks around the ONNX export
and reuses each model's cached graph when only the weights changed (see
``trainer.fastexport``). ``version_payload`` assembles what
``ModelStore.publish`` takes. ``Trainer.refit`` and ``streamfit train``
both publish through these two.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Hashable, Mapping

import numpy as np
import onnx

from modelstore.base import ONNX, STATE
from modelstore.errors import PublishRejected
from trainer.cache import LRU
from trainer.export import convert, library_versions, onnx_metadata
from trainer.fastexport import ExportTemplate, signature
from trainer.gate import check_finite_parameters, check_onnx_parity, parity_rows, run_session
from trainer.learner import Learner
from trainer.named_inputs import feeds_from_encoded, named_input_graph, named_inputs_metadata
from trainer.spec import NAMED_ONNX
from trainer.state import dump_state

logger = logging.getLogger(__name__)

CONVERT = "convert"
REWRITE = "rewrite"


@dataclass
class Exported:
    """An exported, checked learner: ONNX bytes, ``onnx`` metadata, optional named graph."""

    onnx_bytes: bytes
    metadata: dict[str, Any]
    named_bytes: bytes | None
    method: str


@dataclass
class _Template:
    signature: tuple
    template: ExportTemplate | None  # None: this structure cannot be rewritten
    proto: onnx.ModelProto


class Exporter:
    """Exports learners and keeps one graph template per model key (LRU, ``cache_size``)."""

    def __init__(self, cache_size: int = 1000):
        self._templates = LRU(cache_size)

    def export(self, key: Hashable, learner: Learner, X_probe: np.ndarray) -> Exported:
        """Export ``learner`` and check it; raise PublishRejected when it may not be published.

        Parameters are checked before the export too, because skl2onnx casts
        weights to float32 and would turn an oversized one into infinity.
        """
        check_finite_parameters(learner)
        exported = self._rewrite(key, learner, X_probe)
        if exported is None:
            exported = self._convert(key, learner, X_probe)
        if learner.spec.onnx.named_inputs:
            self._add_named(exported, learner, X_probe)
        return exported

    def _rewrite(self, key: Hashable, learner: Learner, X_probe: np.ndarray) -> Exported | None:
        cached = self._templates.get(key)
        if cached is None or cached.template is None or cached.signature != signature(learner):
            return None
        onnx_bytes = cached.template.rewrite(learner)
        try:
            check_onnx_parity(learner, onnx_bytes, X_probe)
        except PublishRejected as exc:
            # The gate caught a rewrite that skl2onnx would have written
            # differently; convert instead and forget the template.
            logger.warning(
                "%s: the rewritten ONNX graph failed the parity check (%s); converting again",
                key, exc.detail,
            )
            self._templates.pop(key)
            return None
        metadata = onnx_metadata(learner, cached.proto)
        metadata["export_method"] = REWRITE
        return Exported(onnx_bytes, metadata, None, REWRITE)

    def _convert(self, key: Hashable, learner: Learner, X_probe: np.ndarray) -> Exported:
        proto = convert(learner)
        onnx_bytes = proto.SerializeToString()
        check_onnx_parity(learner, onnx_bytes, X_probe)
        current = signature(learner)
        cached = self._templates.get(key)
        if cached is None or cached.signature != current:
            template = ExportTemplate.build(learner, proto)
            self._templates.put(key, _Template(current, template, proto))
        metadata = onnx_metadata(learner, proto)
        metadata["export_method"] = CONVERT
        return Exported(onnx_bytes, metadata, None, CONVERT)

    def _add_named(self, exported: Exported, learner: Learner, X_probe: np.ndarray) -> None:
        schema = learner.spec.schema
        named = named_input_graph(onnx.load_from_string(exported.onnx_bytes), schema).SerializeToString()
        X = parity_rows(learner, X_probe)
        feeds, rows = feeds_from_encoded(schema, X)
        if rows.any():
            served = run_session(exported.onnx_bytes, X[rows])
            portable = run_session(named, feeds)
            for name, values in served.items():
                if not np.array_equal(values, portable[name]):
                    raise PublishRejected(
                        "onnx_parity",
                        f"{learner.spec.estimator}: the named-input graph's output {name!r} "
                        "differs from the served graph's; the version is not published",
                    )
        exported.named_bytes = named
        exported.metadata["named_inputs"] = dict(
            named_inputs_metadata(schema, exported.metadata["outputs"]), artifact=NAMED_ONNX
        )


def version_payload(
    learner: Learner,
    exported: Exported,
    metrics: Mapping[str, Any],
    offsets: Mapping[str, int],
    *,
    rejected: Mapping[str, int] | None = None,
    gate_report: Mapping[str, Any] | None = None,
) -> tuple[dict[str, bytes], dict[str, Any]]:
    """Return the artifacts and metadata that ``ModelStore.publish`` takes."""
    spec = learner.spec
    artifacts = {ONNX: exported.onnx_bytes, STATE: dump_state(learner)}
    if exported.named_bytes is not None:
        artifacts[NAMED_ONNX] = exported.named_bytes
    metadata: dict[str, Any] = {
        "spec": spec.to_dict(),
        "task": spec.task,
        "samples_learned": learner.samples_learned_,
        "offsets": dict(offsets),
        "metrics": dict(metrics),
        "onnx": exported.metadata,
        "libraries": library_versions(),
    }
    if rejected:
        metadata["rejected"] = dict(rejected)
    if gate_report is not None:
        metadata["gate"] = dict(gate_report)
    return artifacts, metadata
