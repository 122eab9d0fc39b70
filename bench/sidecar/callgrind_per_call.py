"""Instructions per call of one function from a callgrind profile that
collected inside that function only (--toggle-collect): the program total
divided by the function's call count.

usage: callgrind_per_call.py CALLGRIND.OUT FUNCTION
Prints the count per call, or exits 1 when the function was not called."""
import re
import subprocess
import sys


def main() -> None:
    path, function = sys.argv[1], sys.argv[2]
    text = subprocess.run(["callgrind_annotate", "--tree=caller", "--threshold=100", path],
                          capture_output=True, text=True, check=True).stdout
    lines = text.splitlines()
    total = next(int(m.group(1).replace(",", "")) for line in lines
                 if (m := re.match(r"\s*([\d,]+) .*PROGRAM TOTALS", line)))
    calls = 0
    for i, line in enumerate(lines):
        if re.search(r"\*\s+\S*" + re.escape(function) + r" ", line):
            j = i - 1
            while j >= 0 and " < " in lines[j]:
                m = re.search(r"\((\d+)x\)", lines[j])
                calls += int(m.group(1)) if m else 0
                j -= 1
    if calls == 0:
        sys.exit(f"{function} was not called in {path}")
    print(round(total / calls))


if __name__ == "__main__":
    main()
