"""Operating a provisioned pair over SSH.

* :mod:`~kemari_suite.remote.ops`: ``kemari remote`` (fabric over paramiko).
* :mod:`~kemari_suite.remote.probe`: the script run on each host.
* :mod:`~kemari_suite.remote.labhosts`: sshd hosts in a lab, for tests and trials.
"""
