// A person's path through the Argilla UI, in headless Chromium (Debian's /usr/bin/chromium):
// log in, open a dataset's annotation page, pick a span label, drag over a phrase of the
// response, Submit. Prints one JSON line; the pytest test then pulls and checks the span.
//
// env: ARGILLA_URL, ARGILLA_USER, ARGILLA_PASSWORD, DATASET_URL, LABEL, PHRASE, SCREENSHOT (optional)
const { chromium } = require('playwright-core');

const FLAGS = ['--headless', '--no-sandbox', '--disable-gpu', '--disable-background-networking',
  '--disable-component-update', '--disable-sync', '--no-first-run'];

async function main() {
  const env = process.env;
  const browser = await chromium.launch({ executablePath: env.CHROMIUM || '/usr/bin/chromium', headless: true, args: FLAGS });
  try {
    const page = await browser.newPage({ viewport: { width: 1400, height: 1000 } });
    page.setDefaultTimeout(30000);
    await page.goto(`${env.ARGILLA_URL}/sign-in`);
    await page.fill('input[name=Username]', env.ARGILLA_USER);
    await page.fill('input[name=Password]', env.ARGILLA_PASSWORD);
    await page.click('button[type=submit]');
    await page.waitForURL((url) => !url.pathname.startsWith('/sign-in'));

    await page.goto(env.DATASET_URL);
    const field = page.locator('.span-annotation__field').first();
    await field.waitFor();
    await page.getByText(env.LABEL, { exact: true }).first().click();

    // Drag across the phrase: find its on-screen box with a DOM Range over the text node.
    const box = await field.evaluate((el, phrase) => {
      const text = el.firstChild;
      const start = text.textContent.indexOf(phrase);
      if (start < 0) return null;
      const range = document.createRange();
      range.setStart(text, start);
      range.setEnd(text, start + phrase.length);
      const rects = range.getClientRects();
      const first = rects[0], last = rects[rects.length - 1];
      return { x0: first.left + 1, y0: first.top + first.height / 2, x1: last.right - 1, y1: last.top + last.height / 2 };
    }, env.PHRASE);
    if (!box) throw new Error(`phrase not found in the response field: ${env.PHRASE}`);
    await page.mouse.move(box.x0, box.y0);
    await page.mouse.down();
    await page.mouse.move((box.x0 + box.x1) / 2, box.y1, { steps: 5 });
    await page.mouse.move(box.x1, box.y1, { steps: 5 });
    await page.mouse.up();
    await page.waitForTimeout(300);

    const submit = page.getByRole('button', { name: /Submit/ });
    const [posted] = await Promise.all([
      page.waitForResponse((r) => /\/api\/v1\/records\/[^/]+\/responses/.test(r.url()) && r.request().method() === 'POST'),
      submit.click(),
    ]);
    if (posted.status() >= 300) throw new Error(`Submit answered ${posted.status()}: ${await posted.text()}`);
    if (env.SCREENSHOT) await page.screenshot({ path: env.SCREENSHOT });
    console.log(JSON.stringify({ ok: true, status: posted.status(), url: page.url() }));
  } finally {
    await browser.close();
  }
}

main().catch((err) => {
  console.log(JSON.stringify({ ok: false, error: String(err && err.stack || err) }));
  process.exit(1);
});
