"""The live leaderboard: one broadcaster per process follows Redis's top streams
(`broadcast`) and fans frames encoded once (`frames`) out to its WebSocket and SSE clients
(`endpoints`), each fed as its connection allows (`subscribers`); on SIGTERM, clients are
told to go elsewhere (`going_away`)."""
