"""Batch jobs over the fleet: many independent requests, each answered exactly once.

    from launcher.batch.engine import run_batch
    from launcher.batch.types import BatchOptions

    async for result in run_batch(items, BatchOptions(url="http://127.0.0.1:11434", model="llama3.1:8b")):
        print(result.to_json())

`types` holds the core types (endpoints, items, results, options); the parts live beside them:
`items` (input lines -> items), `journal` (the output file: whole-line appends, resume, torn lines),
`aimd` (how many requests to keep in flight), `engine` (sending, retrying, yielding results),
`stats` and `progress` (what the user sees). `launcher/commands/batch.py` is the thin CLI.
"""
