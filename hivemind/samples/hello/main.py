"""A sample task: prints a few lines over a second or two and writes a result file."""

import platform
import time

for i in range(5):
    print(f"hello from the task, step {i + 1} of 5", flush=True)
    time.sleep(0.3)
with open("result.txt", "w") as fh:
    fh.write(f"computed on {platform.node()} with Python {platform.python_version()}\n")
print("done: wrote result.txt", flush=True)
