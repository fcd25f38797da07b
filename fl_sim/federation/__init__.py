"""Federation: the Flower part — the ClientApp, the ServerApp with the curious strategy, the SecAgg+ path, the
protocol between them, and the data shards and model a scenario implies."""
