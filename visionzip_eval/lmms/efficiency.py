"""``efficiency.jsonl``: one JSON line per request, flushed as it is written (a crash loses
nothing already measured), and medians fed to lmms-eval's own metrics hook."""

from __future__ import annotations

import json
import os
import statistics
import time
from pathlib import Path

from lmms_eval.models.model_utils.gen_metrics import log_metrics

from visionzip_eval.records import EFFICIENCY_JSONL, TIMES, efficiency_row


def _median(rows: list[dict], key: str) -> float | None:
    values = [r[key] for r in rows if r.get(key) is not None]
    return statistics.median(values) if values else None


class EfficiencyLog:
    def __init__(self, directory: str | os.PathLike | None, warmup: int, static: dict):
        self.path = Path(directory) / EFFICIENCY_JSONL if directory else None
        self.warmup = warmup
        self.static = dict(static)
        self.run_id = f"{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}"
        self.rows: list[dict] = []
        self._published = 0
        self._measured = 0
        self._file = None

    def record(self, **fields) -> dict:
        failed = fields.get("error") is not None
        row = efficiency_row(**self.static, run_id=self.run_id, **fields)
        row["warmup"] = not failed and self._measured < self.warmup
        self._measured += 0 if failed else 1
        self.rows.append(row)
        if self.path is not None:
            if self._file is None:  # appended: earlier runs in the same folder stay intact
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self._file = open(self.path, "a", encoding="utf-8")
            self._file.write(json.dumps(row, default=str) + "\n")
            self._file.flush()
        return row

    def summary(self, rows: list[dict] | None = None) -> dict:
        """Medians over measured, non-warm-up requests, overall and per task."""
        rows = self.rows if rows is None else rows
        measured = [r for r in rows if not r["warmup"] and r.get("error") is None]
        out: dict = {
            "requests": len(rows),
            "failed_requests": sum(r.get("error") is not None for r in rows),
            "warmup_requests": sum(bool(r["warmup"]) for r in rows),
        }
        for key in TIMES + ("visual_tokens", "visual_tokens_after_pruning", "visual_tokens_layer_average",
                            "prompt_tokens", "prefill_flops",
                            "peak_memory_bytes"):
            out[f"median_{key}"] = _median(measured, key)
        for task in sorted({r["task"] for r in measured}):
            task_rows = [r for r in measured if r["task"] == task]
            for key in ("prefill_ms", "ttft_ms", "total_ms", "visual_tokens"):
                out[f"{task}/median_{key}"] = _median(task_rows, key)
        return out

    def publish(self) -> dict:
        """Feed the requests since the last publish to lmms-eval's metrics hook, so its
        results JSON carries the medians under ``throughput``."""
        rows = self.rows[self._published :]
        self._published = len(self.rows)
        if not rows:
            return {}
        summary = self.summary(rows)
        measured = [r for r in rows if r.get("error") is None]
        seconds = sum(r["total_ms"] or 0 for r in measured) / 1e3
        tokens = sum(r["generated_tokens"] or 0 for r in measured)
        log_metrics(
            total_elapsed_time=seconds,
            total_gen_tokens=tokens,
            avg_speed=tokens / seconds if seconds > 0 else 0.0,
            additional_metrics={k: v for k, v in summary.items() if v is not None},
        )
        return summary

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
