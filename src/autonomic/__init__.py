"""autonomic: write, check, generate and run governor state machines.

`autonomic.compiler` checks machine files and builds Python modules from them,
`autonomic.runtime` runs the generated governors; `python -m autonomic` is the command line.
"""
