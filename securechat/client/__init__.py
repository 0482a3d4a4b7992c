"""The client (shell): the rules of one identity's chat and the I/O around them.

* ``session`` the client's rules without I/O (frames, store and time in; frames
  and events out), with ``outgoing`` (sealing, held messages), ``prekeys``
  (bundles, no silent downgrade) and ``receipts`` (marks, receipts owed);
* ``events`` what the session reports to an interface; ``peers`` whom we trust;
* ``messenger`` the network pump around the session; ``link`` one authenticated
  connection to the relay; ``invite`` the key exchange by code;
* ``store`` the local state at rest, ``e2e_store`` the E2E state's rows in it,
  ``keystore`` the key directory, ``oserrors`` the one place OSError is mapped;
* ``app`` opens all of it for a command.
"""
