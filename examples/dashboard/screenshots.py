"""The screenshots of docs/dashboard.md: headless Chromium (selenium, as
tests/test_dashboard_browser.py drives it) over the projects of demo.py.

    python examples/dashboard/demo.py --root ui-demo
    python examples/dashboard/screenshots.py --root ui-demo --out docs/images
"""

from __future__ import annotations

import argparse
import os
import shutil
import threading

from logix.dashboard import make_server

SHOTS = {  # file name -> (path on the server, CSS selector of the element to capture or None)
    "dashboard-project.png": ("/project/digits", None),
    "dashboard-scores-digits.png": ("/scores/digits/scores/test-ekfac.safetensors?query=0&k=5",
                                    None),
    "dashboard-scores-words.png": ("/scores/words/scores/queries-per-token.safetensors?k=4",
                                   ".token-heat"),
    "dashboard-scores-completions.png": (
        "/scores/story/scores/completions.safetensors?query=0&k=4", None),
    "dashboard-scores-tokens.png": ("/scores/story/scores/completions.safetensors?query=1&k=4",
                                    ".token-heat"),
    "dashboard-example.png": ("/example/story?id=0", None),
}


def main() -> None:
    from selenium import webdriver
    from selenium.webdriver.common.by import By

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default="ui-demo")
    parser.add_argument("--out", default="docs/images")
    args = parser.parse_args()
    server = make_server([args.root], port=0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--window-size=1280,1400", "--hide-scrollbars"):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options,
                              service=webdriver.ChromeService(shutil.which("chromedriver")))
    try:
        for name, (path, selector) in SHOTS.items():
            driver.get(f"http://127.0.0.1:{server.server_address[1]}{path}")
            out = os.path.join(args.out, name)
            if selector:
                driver.find_element(By.CSS_SELECTOR, selector).screenshot(out)
            else:
                driver.save_screenshot(out)
            print(f"{out}: {os.path.getsize(out) / 1024:.0f} KiB")
    finally:
        driver.quit()
        server.shutdown()
        server.server_close()


if __name__ == "__main__":
    main()
