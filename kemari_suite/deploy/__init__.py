"""Provisioning host pairs with the playbooks in ``playbooks/``.

* :mod:`~kemari_suite.deploy.inventory`: the Ansible inventory and the pairs in it.
* :mod:`~kemari_suite.deploy.render`: kemari.toml and DRBD resource files (the
  playbooks' filters call these).
* :mod:`~kemari_suite.deploy.runner`: ``kemari deploy`` through ansible-runner.
"""
