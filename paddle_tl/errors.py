"""The base of every error a user can fix by changing their input (config,
data, weights, paths). The command line prints these as one line, without a
traceback; anything else is a bug and keeps its traceback."""


class UserError(Exception):
    pass
