module hivemind/native

go 1.19
