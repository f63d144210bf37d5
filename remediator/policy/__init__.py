"""Policy files in, immutable compiled rules out; and the pure decision logic.

* `schema`: the versioned file format (pydantic models, JSON Schema).
* `loader`: YAML with line numbers -> `PolicySet`, every error as file:line:field, all files at
  once; an invalid set is rejected whole.
* `evaluate`: (policy, reading, state, now) -> (new state, decisions). No I/O, no clock.

Must never: read the host, talk to Docker, touch the state database, or call time.time().
"""
