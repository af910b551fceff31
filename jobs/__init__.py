"""Stage entry points: one module per stage of a round, each reading and writing tables only.

A stage never calls another stage; the plan wires them through files. The CLI
and the launcher call these same functions.
"""
