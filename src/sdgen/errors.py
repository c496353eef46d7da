"""The base of every error a user can cause and fix; front ends show its message as one line."""


class UserError(Exception):
    """Bad input (a path, a file, a value): the message says what is wrong and what to do."""
