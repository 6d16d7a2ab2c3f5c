"""Export an Optuna study kept in SQLite (what `qwendoctor tune --storage sqlite:///...` writes) to one JSON file.

    python3 benchmarks/tools/study_export.py STUDY.db OUT.json

Reads the database with sqlite3 alone (no optuna import), so it also runs where optuna is not installed. For each
study: its name, directions and attributes; for each trial: number, state, start and end time, objective
values, parameters (categorical choices decoded from their index), user attributes (qwendoctor stores each
trial's profile, timings, time split and compile record there) and system attributes (the constraints). The
export is what the committed studies under benchmarks/tune/ were reduced to: every figure of the database, a
tenth of its size, readable without optuna. It cannot be resumed as a study.
"""

from __future__ import annotations

import argparse
import json
import os
import sqlite3


def _param(value: float, distribution_json: str):
    distribution = json.loads(distribution_json)
    kind, attributes = distribution.get("name"), distribution.get("attributes", {})
    if kind == "CategoricalDistribution":
        return attributes["choices"][int(value)]
    if kind == "IntDistribution":
        return int(value)
    return value


def export(path: str) -> dict:
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    studies = []
    for study_id, name in db.execute("SELECT study_id, study_name FROM studies ORDER BY study_id"):
        study = {
            "name": name,
            "directions": [d for (d,) in db.execute(
                "SELECT direction FROM study_directions WHERE study_id = ? ORDER BY objective", (study_id,))],
            "user_attrs": {k: json.loads(v) for k, v in db.execute(
                "SELECT key, value_json FROM study_user_attributes WHERE study_id = ?", (study_id,))},
            "system_attrs": {k: json.loads(v) for k, v in db.execute(
                "SELECT key, value_json FROM study_system_attributes WHERE study_id = ?", (study_id,))},
            "trials": [],
        }
        trials = db.execute("SELECT trial_id, number, state, datetime_start, datetime_complete FROM trials "
                            "WHERE study_id = ? ORDER BY number", (study_id,)).fetchall()
        for trial_id, number, state, started, completed in trials:
            study["trials"].append({
                "number": number,
                "state": state,
                "datetime_start": started,
                "datetime_complete": completed,
                "values": [v for (v,) in db.execute(
                    "SELECT value FROM trial_values WHERE trial_id = ? ORDER BY objective", (trial_id,))],
                "params": {k: _param(v, d) for k, v, d in db.execute(
                    "SELECT param_name, param_value, distribution_json FROM trial_params WHERE trial_id = ? "
                    "ORDER BY param_id", (trial_id,))},
                "user_attrs": {k: json.loads(v) for k, v in db.execute(
                    "SELECT key, value_json FROM trial_user_attributes WHERE trial_id = ? ORDER BY key",
                    (trial_id,))},
                "system_attrs": {k: json.loads(v) for k, v in db.execute(
                    "SELECT key, value_json FROM trial_system_attributes WHERE trial_id = ? ORDER BY key",
                    (trial_id,))},
            })
        studies.append(study)
    db.close()
    return {"source": os.path.basename(path), "exported_by": "benchmarks/tools/study_export.py", "studies": studies}


def dumps(document: dict) -> str:
    """JSON with one line per trial: small, and a diff shows which trial changed."""
    head = {k: v for k, v in document.items() if k != "studies"}
    lines = ["{" + json.dumps(head)[1:-1] + ', "studies": [']
    for i, study in enumerate(document["studies"]):
        meta = {k: v for k, v in study.items() if k != "trials"}
        lines.append("{" + json.dumps(meta)[1:-1] + ', "trials": [')
        lines += [json.dumps(t) + ("," if j < len(study["trials"]) - 1 else "") for j, t in enumerate(study["trials"])]
        lines.append("]}" + ("," if i < len(document["studies"]) - 1 else ""))
    lines.append("]}")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("db")
    parser.add_argument("out")
    args = parser.parse_args()
    document = export(args.db)
    with open(args.out, "w", encoding="utf-8") as handle:
        handle.write(dumps(document))
    trials = sum(len(s["trials"]) for s in document["studies"])
    print(f"{args.out}: {len(document['studies'])} study, {trials} trials")


if __name__ == "__main__":
    main()
