"""rayrack-gateway: per-user tokens in front of Ray's Jobs and Serve REST APIs on the head.

Each request carries a user's token; the gateway checks it against users.json (hashes only), applies the
ownership rules (a job belongs to metadata["rayrack.user"], stamped at submit; a Serve application to its
runtime_env's env_vars["RAYRACK_USER"], stamped at deploy), and forwards to Ray's dashboard on loopback with
the cluster token. It holds no state: restarting it never touches a job or an application.
"""
