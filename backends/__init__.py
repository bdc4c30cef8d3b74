"""Real-hardware backends. They run the same policies and training core as the simulator
(`hetsim.training.TrainingCore`) and write the same run directory (`hetsim.results`)."""
