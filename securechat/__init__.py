"""securechat: end-to-end encrypted terminal chat through an untrusted relay."""

__version__ = "0.1.0"
