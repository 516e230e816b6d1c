"""Intel 82545EM gigabit Ethernet (``e1000``, bhyve's ``e82545``) for vmrun."""
