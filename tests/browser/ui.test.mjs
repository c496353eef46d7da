// Drives the sdgen web UI in Debian's headless chromium through playwright-core (no browser download).
// Usage: node ui.test.mjs BASE_URL ARTIFACTS_DIR INIT_PNG
// Exit status 0 when every check passes; each failure is printed on one line.
import { chromium } from "playwright-core";
import { mkdtempSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";

const [base, artifacts, initPng] = process.argv.slice(2);
const executablePath = process.env.CHROMIUM || "/usr/bin/chromium";
const userDataDir = mkdtempSync(join(tmpdir(), "sdgen-chromium-"));
const args = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
  "--disable-sync", "--no-first-run"];

const context = await chromium.launchPersistentContext(userDataDir, {
  executablePath, headless: true, args, viewport: { width: 1280, height: 800 },
});
const page = context.pages()[0] || await context.newPage();
const problems = [];
page.on("pageerror", (error) => problems.push(`page error: ${error.message}`));
page.on("console", (message) => { if (message.type() === "error") problems.push(`console: ${message.text()}`); });
const shot = (name) => page.screenshot({ path: join(artifacts, name), fullPage: true });
const step = async (name, body) => {
  try { await body(); console.log(`ok ${name}`); } catch (error) { problems.push(`${name}: ${error.message}`); await shot(`failed-${name}.png`).catch(() => {}); }
};

try {
  await page.goto(base);
  await page.waitForFunction(() => document.querySelectorAll("#sampler_name option").length > 5);

  await step("generate", async () => {
    await page.fill("#prompt", "a lighthouse by the sea at dusk");
    await page.fill("#steps", "4");
    await page.fill("#seed", "1234");
    await page.keyboard.press("Control+Enter");
    await page.waitForSelector("#results img", { timeout: 60000 });
    await page.waitForFunction(() => document.querySelector("#progress-text").textContent === "done");
    await page.waitForSelector("#gallery img", { timeout: 10000 });
    const alt = await page.getAttribute("#gallery img", "alt");
    if (alt !== "a lighthouse by the sea at dusk") throw new Error(`gallery shows ${alt}`);
    await shot("webui-generated.png");
  });

  await step("search", async () => {
    await page.fill("#search", "lighthouse");
    await page.waitForFunction(() => document.querySelectorAll("#gallery img").length >= 1);
    await page.fill("#search", "no such prompt text");
    await page.waitForFunction(() => document.querySelectorAll("#gallery img").length === 0);
    await page.fill("#search", "");
    await page.waitForFunction(() => document.querySelectorAll("#gallery img").length >= 1);
  });

  await step("interrupt", async () => {
    await page.fill("#prompt", "a very long job");
    await page.fill("#steps", "150");
    await page.click("#generate");
    await page.waitForFunction(() => /step [1-9]/.test(document.querySelector("#progress-text").textContent), null, { timeout: 60000 });
    await shot("webui-progress.png");
    await page.keyboard.press("Escape");
    await page.waitForFunction(() => document.querySelector("#progress-text").textContent.startsWith("interrupted"), null, { timeout: 20000 });
    if (await page.isDisabled("#generate")) throw new Error("Generate stays disabled after the interrupt");
  });

  await step("drop-png", async () => {
    await page.fill("#prompt", "");
    await page.fill("#steps", "20");
    await page.evaluate(async () => {
      const oldest = [...document.querySelectorAll("#gallery img")].pop().src;  // the lighthouse
      const blob = await (await fetch(oldest)).blob();
      const transfer = new DataTransfer();
      transfer.items.add(new File([blob], "dropped.png", { type: "image/png" }));
      document.querySelector("#results").dispatchEvent(new DragEvent("drop", { dataTransfer: transfer, bubbles: true }));
    });
    await page.waitForFunction(() => document.querySelector("#prompt").value === "a lighthouse by the sea at dusk");
    if (await page.inputValue("#steps") !== "4") throw new Error("steps not read back");
    if (await page.inputValue("#seed") !== "1234") throw new Error("seed not read back");
  });

  await step("paint-mask", async () => {
    await page.click("#tab-img2img");
    await page.setInputFiles("#init-file", initPng);
    await page.waitForSelector("#paint:not([hidden])");
    const box = await page.locator("#canvas").boundingBox();
    await page.mouse.move(box.x + box.width * 0.3, box.y + box.height * 0.5);
    await page.mouse.down();
    await page.mouse.move(box.x + box.width * 0.7, box.y + box.height * 0.5, { steps: 8 });
    await page.mouse.up();
    const white = await page.evaluate(() => {
      const data = state.mask.getContext("2d").getImageData(0, 0, state.mask.width, state.mask.height).data;
      let count = 0;
      for (let i = 0; i < data.length; i += 4) if (data[i] > 127) count += 1;
      return count / (data.length / 4);
    });
    if (!(white > 0.02 && white < 0.9)) throw new Error(`painted mask covers ${white} of the image`);
    await shot("webui-mask.png");
    await page.fill("#steps", "4");
    await page.evaluate(() => { document.querySelector("#progress-text").textContent = ""; });
    await page.click("#generate");
    await page.waitForFunction(() => /^(done|failed|interrupted)/.test(document.querySelector("#progress-text").textContent), null, { timeout: 60000 });
    await page.waitForSelector("#results img");
    await shot("webui-inpainted.png");
    const text = await page.textContent("#progress-text");
    const expected = process.env.SDGEN_IMG2IMG === "1" ? /^done/ : /^(done|failed)/;
    if (!expected.test(text)) throw new Error(`img2img ended as ${text}`);
  });
} finally {
  await context.close();
}
if (problems.length) {
  for (const problem of problems) console.log(`FAIL ${problem}`);
  process.exit(1);
}
