import torch

# The test problems are small: one thread avoids oversubscription on small CI machines.
torch.set_num_threads(1)
