"""Host network backends shared by the NICs (virtio-net, e1000).

- :mod:`vmrun.net.backend`: the contract a NIC sees (:class:`NetBackend`, :class:`LinkCallbacks`);
- :mod:`vmrun.net.options`: the machine-file keys every NIC takes (``NET_OPTIONS``), their
  checks, the MAC address, and :func:`open_net_backend` (one backend per device and run);
- the backends: ``user`` (:mod:`vmrun.net.passt`), ``tap`` (:mod:`vmrun.net.tap`), ``socket``
  (:mod:`vmrun.net.stream`), and the pcap tee (:mod:`vmrun.net.capture`).
"""
