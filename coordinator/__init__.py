"""coordinator: model store and import, the parameter service, planning and the client-facing API."""
