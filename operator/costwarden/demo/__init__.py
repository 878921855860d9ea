"""`costwarden demo`: the whole loop on a laptop in a few minutes.

A local control plane (or the current kubeconfig's cluster), the operator, a local model
upstream, the gateway as the sidecar of an agent Job, a budget, and an agent that spends
until the soft limit downgrades its model and the hard cap stops its Job.
"""
