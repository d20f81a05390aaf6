"""The application layer: the `wam` command, the local pipeline and regression orchestration, which tie
training (wam.trainer), the operator (wam.operators) and the torch-free core (wam.platform) together.
Nothing imports this package; it imports the layers below it, the heavy ones inside the commands."""
