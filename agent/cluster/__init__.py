"""The agent in a cluster: registration in Consul, the assignment watch, reconcile, status.

node.py          what the node advertises (capacity, labels, addresses)
health.py        whether the store answers, since when (metrics, `nova ps`)
registration.py  service + TTL check, session, node key; re-registers when lost
assignments.py   the assignment document and the pure reconcile plan
reconciler.py    applies plans with the container manager; replica -> container map
status.py        observed status per replica, written when the store answers
agent.py         wires them together for `nova-agent --consul`
"""
