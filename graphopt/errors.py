"""Error types shared by the framework and the passes.

`UserError` is anything the person running graphopt can fix (a bad file, a wrong feed, an unknown pass
name); the command line turns it into exit code 2.  `PassError` is raised by a pass that cannot do its
job on a given model; the pipeline records it and rolls that pass back.
"""


class UserError(Exception):
    """Bad input: the message names the file, input or node and what to do about it."""


class PassError(Exception):
    """A pass could not run on this model; the message says why in terms a user can act on."""
