"""Output: report records, sinks (mace, jsonl, csv), the summary and the live view."""
